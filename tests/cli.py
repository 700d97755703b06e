"""train.py's command line for the tests, from the pieces it is made of (no module imports train.py): the
registrations it triggers and the run API's entry points."""
import datasets  # noqa: F401  (registers every dataset)
import trainers  # noqa: F401  (registers every trainer and its config section)
from engine.config import build_cfg  # noqa: F401
from engine.runs import build_trainer, main, parse_args, run  # noqa: F401
