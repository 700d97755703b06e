"""Zero-shot CLIP: hand-crafted template per dataset, no training (docs/methods/zeroshotclip.md)."""
from engine.registry import TRAINER_REGISTRY, MethodInfo
from engine.trainer import TrainerX
from trainers.common import cosine_logits, frozen_text_features


METHOD = MethodInfo(configs=dict.fromkeys(("b2n", "fewshot", "xd"), "vit_b16"), trains=False)


@TRAINER_REGISTRY.register("ZeroshotCLIP", info=METHOD)
class ZeroshotCLIP(TrainerX):
    def build_model(self):
        self.text_features = frozen_text_features(self.clip, self.dataset.template, self.classnames)

    def model_inference(self, images):
        return cosine_logits(self.clip.encode_image(images), self.text_features, self.clip.logit_scale)
