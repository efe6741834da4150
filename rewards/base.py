"""The one interface every reward model has.

A reward model scores images in [0, 1] (B x 3 x H x W, differentiable) against prompts and
returns a B-vector. Text-image models also expose their two encoders separately:

    score(x, p) = logit_scale * <encode_image(x), encode_text(p)>        (paper Eq. 7)

so that a relative reward (Eq. 9-11) encodes the image once and reuses text embeddings, which
are cached: a training run sees the same prompts and control phrases again and again, and the
text branch carries no gradient (paper section 3.2).
"""

from collections import OrderedDict

import torch
from torch import nn


def host_to_device(tensor: torch.Tensor, device, dtype=None) -> torch.Tensor:
    """A CPU tensor (token ids, noise drawn with a CPU generator, cached embeddings) copied to
    `device` without stalling the host. A plain `.to("cuda")` from pageable memory waits for the
    stream to drain: mid-step, that lets the GPU run dry while the host then launches the next
    kernels. From pinned memory the copy is queued like a kernel. Cast first, on the CPU."""
    device = torch.device(device)
    if dtype is not None:
        tensor = tensor.to(dtype)
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class RewardModel(nn.Module):
    name: str = "reward"
    uses_text: bool = True
    # True: score = logit_scale * <f_img, f_txt> (CLIP-like); False: a cross-attention scorer.
    scores_by_embedding: bool = True
    # Multiplies the cosine similarity: 1 for HPSv2.1 and CLIP score, exp(logit_scale) for PickScore.
    logit_scale: float = 1.0
    text_cache_size: int = 8192

    def __init__(self):
        super().__init__()
        self._text_cache: "OrderedDict[str, torch.Tensor]" = OrderedDict()

    # Subclasses implement these two on already-preprocessed tensors / raw strings.
    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must implement _image_features")

    def _text_features(self, prompts: list[str]) -> torch.Tensor:
        raise ValueError(f"reward '{self.name}' scores images only; it has no text encoder")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must implement preprocess")

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features, differentiable w.r.t. `images` (B x 3 x H x W in [0, 1])."""
        with torch.profiler.record_function(f"reward_image_features_{self.name}"):  # a named range in profiles
            features = self._image_features(self.preprocess(images))
        return features / features.norm(dim=-1, keepdim=True)

    def image_encoding(self, images: torch.Tensor) -> torch.Tensor:
        """What the reward computes from the images alone, to reuse when the same images are scored
        against several texts (control phrases, SRPO's branches): a CLIP-like model's normalised
        features; a cross-attention scorer overrides it with its image states."""
        return self.encode_image(images)

    def score_encoding(self, encoding: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """forward() from an image_encoding: the same scores without encoding the images again."""
        return self.score_features(encoding, self.encode_text(prompts))

    def image_tower(self) -> nn.Module | None:
        """The module that turns preprocessed pixels into image states (what --compile_reward
        compiles); None: not named (a reward of one's own need not)."""
        return None

    def compile_image_tower(self, backend: str = "inductor", mode: str | None = None) -> None:
        """torch.compile the image tower whole, one graph per batch size and grad mode. At batch 1
        a ViT-H/14 at 224 px is 257 tokens: small matmuls, so its ~500 kernels per pass cost more
        in launches than in arithmetic; compiled, its norms, GELUs and residual adds fuse into
        fewer kernels."""
        tower = self.image_tower()
        if tower is None:
            raise ValueError(f"--compile_reward: reward '{self.name}' names no image_tower() to compile; "
                             "define it (the module that turns pixels into image states) or drop --compile_reward")
        tower.compile(backend=backend, mode=mode, dynamic=False)

    def clear_text_cache(self) -> None:
        self._text_cache.clear()

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text features (N x D), cached per string."""
        if not self.uses_text:
            raise ValueError(f"reward '{self.name}' scores images only; it has no text encoder")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            features = self._text_features(missing).float()
            features = features / features.norm(dim=-1, keepdim=True)
            for prompt, feature in zip(missing, features):
                self._text_cache[prompt] = feature
        for prompt in prompts:
            self._text_cache.move_to_end(prompt)
        result = torch.stack([self._text_cache[p] for p in prompts])
        while len(self._text_cache) > self.text_cache_size:
            self._text_cache.popitem(last=False)
        return result

    def score_features(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Eq. 7: logit_scale * f_img(x)^T f_txt(p), row by row."""
        return self.logit_scale * (image_features.float() * text_features.to(image_features.device)).sum(-1)

    def check_prompts(self, images: torch.Tensor, prompts) -> None:
        if prompts is None or len(prompts) != images.shape[0]:
            count = 0 if prompts is None else len(prompts)
            raise ValueError(f"reward '{self.name}' got {images.shape[0]} images but {count} prompts; pass one prompt per image")

    def forward(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        self.check_prompts(images, prompts)
        return self.score_encoding(self.image_encoding(images), prompts)
