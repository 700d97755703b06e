"""Table specs: one YAML file per paper table / figure (``configs/tables/<name>.yaml``).

A spec names the runs a table needs and how the table is laid out; the planner, the launcher and the
renderer all read the same object, so a table and the runs behind it cannot drift apart. Keys::

    name: table1                  # defaults to the file name
    title: "Table 1: ..."
    base: other.yaml              # optional: start from another spec (same folder), then override keys
    regime: lt_b2n                # lt_b2n | fewshot | xd | dg
    settings: [10, 20, 50]        # lt_b2n: imbalance factors; fewshot: shots; xd/dg: source imbalance factor
    seeds: [1, 2, 3, 4, 5]
    datasets: [caltech101, ...]   # b2n: the datasets; xd/dg: the targets. An entry may be a mapping
                                  # {name, config, opts}: folder name, configs/datasets/<config>.yaml, KEY VALUE opts
                                  # (dataset opts are not in the folder name: give such a dataset its own name)
    source: imagenet              # xd/dg only
    opts: []                      # KEY VALUE opts for every run (they become part of every run folder's name)
    eval_key: test                # which entry of results.json's "results" the cells read
    methods:                      # the table's rows (each variant of a method is a row)
      - {label: CoOp+LA, trainer: CoOp, config: vit_b16_ep50_ctxv1, loss: la}
      - {label: MMA, trainer: MMA}   # no config: the method's own for the regime (its registry entry), with its
                                  # ImageNet variant as config_by_dataset where the spec trains on ImageNet
      - label: LAMP
        trainer: LAMP
        config: vit_b16_lt_b2n
        opts: []                  # KEY VALUE opts of this method (part of its folder name)
        variants: [{label: MPP, opts: [TRAINER.LAMP.USE_MSP, "False"]}]
        sweep: [{name: beta, key: TRAINER.LAMP.BETA, values: [0.0, 2.0], default: 2.0}]
      - label: MMRL+LA
        trainer: MMRL
        config: vit_b16_b2n
        config_by_dataset: {imagenet: vit_b16_b2n_imagenet}   # optional: another config (and config folder) for
                                  # the runs trained on these datasets (b2n: each dataset; xd/dg: the source), as
                                  # scripts/mmrl/*.sh pick vit_b16_b2n_imagenet for ImageNet; a name no run
                                  # trains on is an error
        loss: la
    layout:
      metrics: [hm_acc, hm_f1]    # see METRICS
      metric_labels: {hm_acc: HM}
      average: last               # last | first | none: the mean over datasets (xd: over targets, w/o source)
      average_label: Average
      source_column: true         # xd/dg: the source dataset's own test as the first column group
      blocks: auto                # auto (one block per setting when there are several) | settings | none
      average_hm: per_dataset     # B2N: the Average column's HM = mean of the per-dataset HMs (LAMP's tables) |
                                  # of_averages = HM of the average base / new (as VaMP reports it)
      tex_max_columns: 12         # LaTeX: at most this many value columns per tabular (wider: split by groups)
    paper: table1_paper.csv       # the paper's numbers, next to the spec (a row may have none: shown as –)
    paper_omit_rows: [CLIP]       # rows whose paper numbers are not comparable: shown as – (say why in notes)
    notes: ["..."]                # caveats: printed under the markdown table and in the LaTeX caption
    paper_source: lamp_paper.txt  # the text the CSV's line numbers refer to (default lamp_paper.txt)
    plot: {kind: bars}            # bars (Fig. 1) | sweep (Fig. 3) | none

A variant whose opts are empty (e.g. the default value of a sweep axis, ``default:``) uses the plain config
folder, so it is the very run the main tables use.
"""
import functools
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from engine.cli import UserError
from engine.config import load_yaml, yaml_error_parts

REPO = Path(__file__).resolve().parents[2]
SPEC_DIR = REPO / "configs" / "tables"
REGIMES = ("lt_b2n", "fewshot", "xd", "dg")
B2N_METRICS = ("base_acc", "new_acc", "hm_acc", "base_f1", "new_f1", "hm_f1", "hm_mean",
               "base_head_acc", "base_tail_acc")
ALL_METRICS = ("acc", "f1", "head_acc", "tail_acc")
METRIC_LABELS = {"base_acc": "Base", "new_acc": "New", "hm_acc": "HM-A", "base_f1": "Base F1", "new_f1": "New F1",
                 "hm_f1": "HM-M", "hm_mean": "Avg.", "base_head_acc": "Head", "base_tail_acc": "Tail",
                 "acc": "Acc.", "f1": "Mac.", "head_acc": "Head", "tail_acc": "Tail"}
SPEC_KEYS = {"name", "title", "base", "regime", "settings", "seeds", "datasets", "source", "opts", "eval_key",
             "methods", "layout", "paper", "paper_source", "paper_omit_rows", "plot", "notes"}
LAYOUT_KEYS = {"metrics", "metric_labels", "average", "average_label", "average_hm", "source_column", "blocks",
               "tex_max_columns"}
AVERAGE_HM = ("per_dataset", "of_averages")
METHOD_KEYS = {"label", "trainer", "config", "config_by_dataset", "loss", "opts", "variants", "sweep"}


class SpecError(UserError):
    """A table spec that cannot be used (unknown key, missing field, bad value)."""


# A name that becomes one folder of a run's path (dataset, trainer, config): one plain path component, so
# that no run folder leaves --output (and no dataset config leaves configs/datasets).
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
# Keys the planner sets for every run (where runs and data live): a spec may not move them.
PLANNER_KEYS = ("OUTPUT_DIR", "DATASET.ROOT", "DATASET.CACHE_DIR")
TRAINER_CONFIGS = REPO / "configs" / "trainers"
DATASET_CONFIGS = REPO / "configs" / "datasets"


def _safe_name(value, what, where):
    value = str(value)
    if not _SAFE_NAME.fullmatch(value) or ".." in value:
        raise SpecError(f"{where}: {what} {value!r} must be a plain name (letters, digits, . _ + -): it becomes a "
                        f"folder under --output / a file under configs/")
    return value


def _trainer_names():
    return sorted(p.name for p in TRAINER_CONFIGS.iterdir() if p.is_dir())


def trainer_config_path(trainer, config):
    return TRAINER_CONFIGS / trainer / f"{config}.yaml"


def _check_trainer_config(trainer, config, where):
    if not (TRAINER_CONFIGS / trainer).is_dir():
        raise SpecError(f"{where}: unknown trainer {trainer!r} (known: {' '.join(_trainer_names())})")
    if not trainer_config_path(trainer, config).is_file():
        known = sorted(p.stem for p in (TRAINER_CONFIGS / trainer).glob("*.yaml"))
        raise SpecError(f"{where}: unknown config {config!r} of {trainer} (no configs/trainers/{trainer}/{config}.yaml; "
                        f"known: {' '.join(known)})")


@dataclass(frozen=True)
class Dataset:
    name: str            # folder name and column key
    config: str          # configs/datasets/<config>.yaml
    opts: tuple = ()     # extra KEY VALUE opts of this dataset


@dataclass(frozen=True)
class Row:
    """One table row: a method (trainer, config, loss) with one variant (extra opts)."""
    label: str
    method: str          # the method's label (rows of one method share it)
    trainer: str
    config: str
    loss: str
    opts: tuple          # method opts + variant opts (the variant part of the folder name)
    axes: tuple = ()     # ((axis name, value label), ...) for sweeps
    config_by_dataset: tuple = ()   # ((dataset name, config), ...): the config of runs trained on that dataset

    def config_for(self, dataset):
        """The trainer config of a run trained on ``dataset`` (a dataset name): the override or ``config``."""
        return dict(self.config_by_dataset).get(dataset, self.config)


@dataclass
class Spec:
    name: str
    title: str
    regime: str
    settings: list
    seeds: list
    datasets: list
    rows: list
    source: Dataset = None
    opts: tuple = ()
    eval_key: str = "test"
    metrics: list = field(default_factory=list)
    metric_labels: dict = field(default_factory=dict)
    average: str = "last"
    average_label: str = "Average"
    axis_labels: dict = field(default_factory=dict)   # sweep axis name -> its printed label (e.g. beta -> β)
    source_column: bool = False
    blocks: bool = False
    paper: Path = None
    paper_source: str = "lamp_paper.txt"
    plot: dict = field(default_factory=dict)
    path: Path = None
    notes: list = field(default_factory=list)
    paper_omit_rows: list = field(default_factory=list)
    average_hm: str = "per_dataset"
    tex_max_columns: int = 12

    def first_column_label(self):
        """"Method", or the swept key (β, M) when every row is one value of the same sweep axes."""
        axes = {tuple(a[0] for a in r.axes) for r in self.rows}
        if len(axes) == 1 and all(r.axes for r in self.rows) and all(r.method == self.rows[0].method for r in self.rows):
            return ", ".join(self.axis_labels.get(a, a) for a in next(iter(axes)))
        return "Method"

    @property
    def b2n(self):
        return self.regime in ("lt_b2n", "fewshot")

    def metric_label(self, metric):
        return self.metric_labels.get(metric, METRIC_LABELS[metric])

    def groups(self):
        """Column groups in order: [(key, label)], key a dataset name or '__average__'."""
        info = dataset_info()
        groups = [(d.name, info.get(d.name, {}).get("label", d.name)) for d in self.datasets]
        if self.source_column and self.source is not None:
            label = info.get(self.source.name, {}).get("label", self.source.name) + " (Source)"
            groups.insert(0, (self.source.name, label))
        avg = ("__average__", self.average_label)
        if self.average == "first":
            groups.insert(1 if self.source_column else 0, avg)
        elif self.average == "last":
            groups.append(avg)
        return groups

    def block_keys(self):
        """One block of rows per setting (a spec without blocks has exactly one setting)."""
        return list(self.settings)


@functools.lru_cache(maxsize=None)
def dataset_info():
    return load_yaml(SPEC_DIR / "datasets.yaml", "dataset table")


def _opts(value, where, allowed=()):
    value = list(value or [])
    if len(value) % 2:
        raise SpecError(f"{where}: opts must be KEY VALUE pairs, got {value}")
    moved = [k for k in value[0::2] if str(k) in PLANNER_KEYS and str(k) not in allowed]
    if moved:
        raise SpecError(f"{where}: opts may not set {', '.join(map(str, moved))} (the planner sets it from "
                        f"--output / --data)")
    return tuple(str(v) for v in value)


def _dataset(entry, where):
    if isinstance(entry, str):
        entry = {"name": entry}
    if not (isinstance(entry, dict) and "name" in entry):
        raise SpecError(f"{where}: a dataset is a name or a mapping with 'name', got {entry!r}")
    unknown = set(entry) - {"name", "config", "opts"}
    if unknown:
        raise SpecError(f"{where}: unknown dataset key(s) {sorted(unknown)}")
    name = _safe_name(entry["name"], "dataset name", where)
    config = _safe_name(entry.get("config", name), "dataset config", where)
    if not (DATASET_CONFIGS / f"{config}.yaml").is_file():
        known = sorted(p.stem for p in DATASET_CONFIGS.glob("*.yaml"))
        raise SpecError(f"{where}: unknown dataset {config!r} (no configs/datasets/{config}.yaml; known: {' '.join(known)})")
    # a dataset's own DATASET.ROOT is a folder inside --data (the planner resolves and checks it)
    return Dataset(name, config, _opts(entry.get("opts"), where, allowed=("DATASET.ROOT",)))


def _value_label(value):
    if isinstance(value, dict):
        return str(value["label"]), str(value["value"])
    return str(value), str(value)


def _with_method_config(method, regime, trained_on, where):
    """A method without ``config`` gets its own config for the regime from its registry entry (MethodInfo), and
    its ImageNet variant as ``config_by_dataset`` where a run of the spec trains on ImageNet."""
    if method.get("config") or not method.get("trainer"):
        return method
    import trainers  # noqa: F401  (the methods' registry entries)
    from engine.registry import TRAINER_REGISTRY
    from engine.runs import CONFIG_ROLE
    trainer = _safe_name(method["trainer"], "trainer", where)
    if trainer not in TRAINER_REGISTRY:
        raise SpecError(f"{where}: unknown trainer {trainer!r} (known: {' '.join(TRAINER_REGISTRY.names())})")
    info, role = TRAINER_REGISTRY.info(trainer), CONFIG_ROLE[regime]
    if not info.config(role):
        raise SpecError(f"{where}: {trainer} has no {role} config in its registry entry; name one (config: ...)")
    method = dict(method, config=info.config(role))
    if "config_by_dataset" not in method and "imagenet" in trained_on and info.config(role, "imagenet") != method["config"]:
        method["config_by_dataset"] = {"imagenet": info.config(role, "imagenet")}
    return method


def _rows(method, where):
    unknown = set(method) - METHOD_KEYS
    if unknown:
        raise SpecError(f"{where}: unknown method key(s) {sorted(unknown)} (known: {sorted(METHOD_KEYS)})")
    for key in ("trainer", "config"):
        if not method.get(key):
            raise SpecError(f"{where}: a method needs '{key}'")
    trainer = _safe_name(method["trainer"], "trainer", where)
    method = dict(method, trainer=trainer, config=_safe_name(method["config"], "config", where))
    _check_trainer_config(trainer, method["config"], where)
    label = str(method.get("label", method["trainer"]))
    loss = str(method.get("loss", "ce"))
    if loss not in ("ce", "la"):
        raise SpecError(f"{where}: loss must be ce or la, got {loss!r}")
    base_opts = _opts(method.get("opts"), where)
    by_dataset = method.get("config_by_dataset") or {}
    if not isinstance(by_dataset, dict) or not all(isinstance(v, str) and v for v in by_dataset.values()):
        raise SpecError(f"{where}: config_by_dataset maps dataset names to config names, got {by_dataset!r}")
    by_dataset = tuple(sorted((str(k), _safe_name(v, "config", where)) for k, v in by_dataset.items()))
    for _, cfg in by_dataset:
        _check_trainer_config(trainer, cfg, f"{where}: config_by_dataset")
    variants = []
    for v in method.get("variants") or []:
        variants.append((str(v.get("label", "")), _opts(v.get("opts"), where), ()))
    if method.get("sweep"):
        axes = method["sweep"]
        for axis in axes:
            if not {"name", "key", "values"} <= set(axis):
                raise SpecError(f"{where}: a sweep axis needs name, key and values, got {axis}")
            unknown = set(axis) - {"name", "key", "values", "default", "label"}
            if unknown:
                raise SpecError(f"{where}: unknown sweep axis key(s) {sorted(unknown)}")
        for combo in itertools.product(*[axis["values"] for axis in axes]):
            opts, labels = [], []
            for axis, value in zip(axes, combo):
                vlabel, vvalue = _value_label(value)
                default = axis.get("default")
                if default is None or _value_label(default)[1] != vvalue:
                    opts += [str(axis["key"]), vvalue]
                labels.append((str(axis["name"]), vlabel))
            text = ", ".join(f"{n}={v}" for n, v in labels) if len(labels) > 1 else labels[0][1]
            variants.append((text, tuple(opts), tuple(labels)))
    if not variants:
        variants = [("", (), ())]
    rows = []
    for vlabel, vopts, axes in variants:
        row_label = " ".join(x for x in (label, vlabel) if x) or method["trainer"]
        rows.append(Row(row_label, label, str(method["trainer"]), str(method["config"]), loss,
                        base_opts + vopts, axes, by_dataset))
    return rows


def load_spec(path_or_name, overrides=None):
    """Read a spec by path or by name (``configs/tables/<name>.yaml``); ``overrides`` replace top-level keys
    (handy for a small ad-hoc spec, e.g. ``{"seeds": [1]}``). A dict is accepted as the spec itself."""
    if isinstance(path_or_name, dict):
        raw, path = dict(path_or_name), None
    else:
        path = Path(path_or_name)
        if not path.suffix:
            path = SPEC_DIR / f"{path_or_name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in SPEC_DIR.glob("*.yaml") if p.stem != "datasets")
            raise SpecError(f"no table spec {path} (known: {' '.join(known)})")
        raw = _read_with_base(path)
    raw.update(overrides or {})
    return build_spec(raw, path)


def read_yaml(path):
    """A spec file as data; malformed YAML and python tags (``!!python/...``) are one-line SpecErrors."""
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as err:
        line, column, problem = yaml_error_parts(err)
        at = f" (line {line}, column {column})" if line is not None else ""
        if "python/" in str(err):
            raise SpecError(f"{path}: YAML python tags are not allowed in a spec{at}: {problem}") from None
        raise SpecError(f"{path}: not valid YAML{at}: {problem}") from None


def _read_with_base(path, depth=0):
    if not Path(path).is_file():
        raise SpecError(f"{path}: no such spec file")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec is a mapping")
    if raw.get("base"):
        if depth > 3:
            raise SpecError(f"{path}: 'base' chain too deep")
        merged = _read_with_base(path.parent / raw["base"], depth + 1)
        merged.pop("name", None)
        merged.pop("paper", None)
        merged.update({k: v for k, v in raw.items() if k != "base"})
        return merged
    return raw


def build_spec(raw, path=None):
    where = str(path or raw.get("name", "spec"))
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(SPEC_KEYS)})")
    regime = raw.get("regime")
    if regime not in REGIMES:
        raise SpecError(f"{where}: regime must be one of {REGIMES}, got {regime!r}")
    for key in ("settings", "seeds", "datasets", "methods"):
        if not raw.get(key):
            raise SpecError(f"{where}: '{key}' is missing or empty")
    layout = dict(raw.get("layout") or {})
    unknown = set(layout) - LAYOUT_KEYS
    if unknown:
        raise SpecError(f"{where}: unknown layout key(s) {sorted(unknown)} (known: {sorted(LAYOUT_KEYS)})")
    allowed = B2N_METRICS if regime in ("lt_b2n", "fewshot") else ALL_METRICS
    metrics = list(layout.get("metrics") or (["hm_acc", "hm_f1"] if regime in ("lt_b2n", "fewshot") else ["acc", "f1"]))
    bad = [m for m in metrics + list(layout.get("metric_labels") or {}) if m not in allowed]
    if bad:
        raise SpecError(f"{where}: metric(s) {bad} not available for regime {regime} (choose from {allowed})")
    average = str(layout.get("average", "last"))
    if average not in ("first", "last", "none"):
        raise SpecError(f"{where}: layout.average must be first, last or none, got {average!r}")
    blocks = layout.get("blocks", "auto")
    if blocks not in ("auto", "settings", "none"):
        raise SpecError(f"{where}: layout.blocks must be auto, settings or none, got {blocks!r}")
    try:
        settings = [int(s) for s in raw["settings"]]
        seeds = [int(s) for s in raw["seeds"]]
    except (TypeError, ValueError):
        raise SpecError(f"{where}: settings and seeds are lists of integers, got {raw['settings']!r} / {raw['seeds']!r}") from None
    if not isinstance(raw["methods"], list) or not all(isinstance(m, dict) for m in raw["methods"]):
        raise SpecError(f"{where}: methods is a list of mappings")
    if blocks == "none" and len(settings) != 1:
        raise SpecError(f"{where}: layout.blocks none needs exactly one setting, got {settings}")
    source = None
    if regime in ("xd", "dg"):
        source = _dataset(raw.get("source", "imagenet"), where)
    datasets = [_dataset(d, f"{where}: datasets") for d in raw["datasets"]]
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise SpecError(f"{where}: duplicate dataset(s) in {names}")
    trained_on = set(names) if regime in ("lt_b2n", "fewshot") else {source.name}
    rows = []
    for i, method in enumerate(raw["methods"]):
        rows += _rows(_with_method_config(method, regime, trained_on, f"{where}: methods[{i}]"), f"{where}: methods[{i}]")
    labels = [r.label for r in rows]
    dup = sorted({l for l in labels if labels.count(l) > 1})
    if dup:
        raise SpecError(f"{where}: duplicate row label(s) {dup}")
    for r in rows:
        stray = sorted(set(dict(r.config_by_dataset)) - trained_on)
        if stray:
            raise SpecError(f"{where}: row {r.label!r}: config_by_dataset names {stray}, which no run of this spec "
                            f"trains on ({sorted(trained_on)})")
    paper = raw.get("paper")
    if paper:
        paper = (path.parent if path else SPEC_DIR) / paper
    notes = raw.get("notes") or []
    notes = [notes] if isinstance(notes, str) else notes
    if not isinstance(notes, list) or not all(isinstance(n, str) and n.strip() for n in notes):
        raise SpecError(f"{where}: notes is a text or a list of texts, got {raw.get('notes')!r}")
    omit = raw.get("paper_omit_rows") or []
    stray = sorted(set(map(str, omit)) - set(labels))
    if stray:
        raise SpecError(f"{where}: paper_omit_rows names {stray}, which are not rows of this spec ({labels})")
    average_hm = str(layout.get("average_hm", "per_dataset"))
    if average_hm not in AVERAGE_HM:
        raise SpecError(f"{where}: layout.average_hm must be one of {AVERAGE_HM}, got {average_hm!r}")
    try:
        tex_max_columns = int(layout.get("tex_max_columns", 12))
    except (TypeError, ValueError):
        tex_max_columns = 0
    if tex_max_columns < 1:
        raise SpecError(f"{where}: layout.tex_max_columns must be a positive integer, got {layout.get('tex_max_columns')!r}")
    axis_labels = {str(a["name"]): str(a["label"]) for m in raw["methods"] for a in (m.get("sweep") or []) if "label" in a}
    return Spec(
        name=str(raw.get("name") or (path.stem if path else "table")),
        title=str(raw.get("title", "")),
        regime=regime, settings=settings, seeds=seeds, datasets=datasets, rows=rows,
        source=source, opts=_opts(raw.get("opts"), where), eval_key=str(raw.get("eval_key", "test")),
        metrics=metrics, metric_labels=dict(layout.get("metric_labels") or {}), average=average,
        average_label=str(layout.get("average_label", "Average")),
        source_column=bool(layout.get("source_column", regime in ("xd", "dg"))),
        blocks=(blocks == "settings") or (blocks == "auto" and len(settings) > 1),
        paper=paper, paper_source=str(raw.get("paper_source", "lamp_paper.txt")), plot=dict(raw.get("plot") or {}), path=path,
        notes=[" ".join(n.split()) for n in notes], paper_omit_rows=[str(r) for r in omit], average_hm=average_hm,
        tex_max_columns=tex_max_columns, axis_labels=axis_labels,
    )
