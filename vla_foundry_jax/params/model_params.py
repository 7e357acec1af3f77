"""Model params: one frozen dataclass per type key of VLA Foundry's ModelParams page.

Field names, types, defaults and inheritance follow the original. Fields the original does not have
are marked "(JAX)" in their comment. Everything is configurable from gin under the type key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

from vla_foundry_jax.params.base import BaseParams, ParamsError, register_params

NORM_TYPES = (
    "default_layer_norm",
    "lp_layer_norm",
    "gain_only_lp_layer_norm",
    "gain_only_layer_norm",
    "no_wb_layer_norm",
    "rms_norm",
)
FFN_TYPES = ("swiglu", "gelu")
POSITIONAL_EMBEDDING_TYPES = ("rotary", "rotary_float32", "learned", "none")
# "torch_attn"/"auto" (the original's names) -> the backend's best kernel (cuDNN flash on GPU, splash on TPU, the
# head-major kernel on CPU; layers.attention.choose_kernel), "xla" -> jax.nn.dot_product_attention's XLA path,
# "cudnn" -> cuDNN flash where eligible, "reference" -> explicit softmax(QK^T)V einsums (debugging / parity).
ATTN_NAMES = ("torch_attn", "auto", "xla", "cudnn", "reference")


@dataclasses.dataclass(frozen=True)
class ModelParams(BaseParams):
    """Fields every model type inherits."""

    family = "model"

    type: str | None = None
    resume_from_checkpoint: str | None = None
    resume_weights_only: bool = False
    freeze: bool = False


def _choice(where: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ParamsError(f"{where} = {value!r} is not supported; choose one of {list(choices)}.")


@register_params("transformer")
class TransformerParams(ModelParams):
    """From-scratch decoder (GPT-style)."""

    norm_type: str = "default_layer_norm"
    ffn_type: str = "swiglu"
    qk_norm: bool = False
    positional_embedding_type: str = "rotary"
    attn_name: str = "torch_attn"
    hidden_dim: int = 96
    n_layers: int = 8
    n_heads: int = 4
    vocab_size: int = 50432
    post_embed_norm: bool = False
    norm_eps: float = 1e-5
    weight_tying: bool = False
    cast_output_to_float32: bool = False
    max_seq_len: int = 2048
    is_causal: bool = True

    def validate(self) -> None:
        _choice("transformer.norm_type", self.norm_type, NORM_TYPES)
        _choice("transformer.ffn_type", self.ffn_type, FFN_TYPES)
        _choice("transformer.positional_embedding_type", self.positional_embedding_type, POSITIONAL_EMBEDDING_TYPES)
        _choice("transformer.attn_name", self.attn_name, ATTN_NAMES)
        for name in ("hidden_dim", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ParamsError(f"transformer.{name} must be positive, got {getattr(self, name)}.")
        if self.vocab_size < 0:
            raise ParamsError(f"transformer.vocab_size must be >= 0, got {self.vocab_size}.")
        if self.hidden_dim % self.n_heads:
            raise ParamsError(
                f"transformer.n_heads = {self.n_heads} does not divide transformer.hidden_dim = {self.hidden_dim}; "
                f"pick n_heads among the divisors of hidden_dim."
            )
        if self.positional_embedding_type.startswith("rotary") and (self.hidden_dim // self.n_heads) % 2:
            raise ParamsError(
                f"rotary embeddings need an even head dim; hidden_dim / n_heads = {self.hidden_dim // self.n_heads}."
            )


# The seed page's transformer_hf reads hidden_dim / vocab_size from the HF config "on first access". Params hold no
# reading code: vla_foundry_jax.configs.hf_hub registers its (cached) reader here when the package is imported.
_HF_CONFIG_READER: list[Callable[[str], Any]] = []


def set_hf_config_reader(reader: Callable[[str], Any]) -> None:
    """Install the function that turns an ``hf_pretrained`` value into its ``transformers`` config."""
    _HF_CONFIG_READER[:] = [reader]


def _text_config(cfg):
    return getattr(cfg, "text_config", None) or cfg


@register_params("transformer_hf")
class TransformerHFParams(ModelParams):
    """A causal LM from a Hugging Face checkpoint; ``hidden_dim``/``vocab_size`` come from its config."""

    hf_pretrained: str | None = None

    def hf_config(self):
        if not self.hf_pretrained:
            raise ParamsError(f"{self.gin_name}.hf_pretrained is not set; give a hub id or a local directory.")
        if not _HF_CONFIG_READER:
            raise RuntimeError("no HF config reader is installed; import vla_foundry_jax (configs.hf_hub) first.")
        return _HF_CONFIG_READER[0](self.hf_pretrained)

    @property
    def hidden_dim(self) -> int:
        return _text_config(self.hf_config()).hidden_size

    @property
    def vocab_size(self) -> int:
        return _text_config(self.hf_config()).vocab_size


@register_params("vit")
class ViTParams(ModelParams):
    """From-scratch Vision Transformer."""

    pretrained: str | None = None
    interpolation_mode: str = "bicubic"
    hidden_dim: int = 768
    inter_dim: int = 3072
    patch_size: int = 16
    img_size: int = 384
    n_heads: int = 12
    dropout: float = 0.0
    n_layers: int = 12
    ln_eps: float = 1e-6
    cls_flag: bool = False
    projector_pixel_shuffle_factor: int = 1

    def validate(self) -> None:
        where = self.gin_name
        if self.hidden_dim % self.n_heads:
            raise ParamsError(
                f"{where}.n_heads = {self.n_heads} does not divide {where}.hidden_dim = {self.hidden_dim}."
            )
        if self.img_size % self.patch_size:
            raise ParamsError(
                f"{where}.img_size = {self.img_size} is not divisible by {where}.patch_size = {self.patch_size}."
            )
        grid = self.img_size // self.patch_size
        if self.projector_pixel_shuffle_factor < 1 or grid % self.projector_pixel_shuffle_factor:
            raise ParamsError(
                f"{where}.projector_pixel_shuffle_factor = {self.projector_pixel_shuffle_factor} must divide the "
                f"token grid side {grid} (img_size / patch_size)."
            )


@register_params("vit_hf")
class ViTHFParams(TransformerHFParams):
    """A Hugging Face / timm ViT; ``hidden_dim`` is a real field here (it shadows the HF property)."""

    hidden_dim: int = 768
    projector_pixel_shuffle_factor: int = 1


@register_params("vlm")
class VLMParams(ModelParams):
    """ViT + projector + language model."""

    vit: ViTParams | ViTHFParams = dataclasses.field(default_factory=ViTParams)
    transformer: TransformerParams | TransformerHFParams = dataclasses.field(default_factory=TransformerParams)
    image_token_id: int | None = None
    processor: str | None = None


@register_params("vlm_hf")
class VLMHFParams(TransformerHFParams):
    """A whole VLM from one Hugging Face checkpoint (PaliGemma, SmolVLM2, ...)."""


@register_params("unet")
class UNetParams(ModelParams):
    in_channels: int = 3
    out_channels: int = 3
    time_emb_dim: int = 256
    text_emb_dim: int = 512
    channels: list[int] = dataclasses.field(default_factory=list)
    image_size: int = 128
    time_mlp_float32: bool = False
    # (JAX) diffusers UNet2DModel / UNet2DConditionModel directory or hub id loaded when
    # stable_diffusion.use_diffusers_unet is set (its config.json gives the architecture).
    hf_pretrained: str | None = None


@register_params("noise_scheduler")
class NoiseSchedulerParams(ModelParams):
    num_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    clamp_range: tuple[float, float] | None = (-1.5, 1.5)

    def validate(self) -> None:
        if self.clamp_range is not None and self.clamp_range[0] >= self.clamp_range[1]:
            raise ParamsError(f"noise_scheduler.clamp_range = {self.clamp_range} must be (low, high) with low < high.")


@register_params("clip_hf")
class CLIPHFParams(TransformerHFParams):
    freeze_text_encoder: bool = False
    freeze_image_encoder: bool = False


@register_params("clip_openclip")
class CLIP_OpenCLIPParams(ModelParams):  # noqa: N801  (the original's name)
    architecture: str | None = None
    pretrained_weights: str | None = None
    freeze_text_encoder: bool = False
    freeze_image_encoder: bool = False


@register_params("stable_diffusion")
class StableDiffusionParams(ModelParams):
    unet: UNetParams = dataclasses.field(default_factory=UNetParams)
    noise_scheduler: NoiseSchedulerParams = dataclasses.field(default_factory=NoiseSchedulerParams)
    use_diffusers_unet: bool = False
    use_diffusers_scheduler: bool = False
    use_flow_matching_scheduler: bool = False
    clip: CLIPHFParams = dataclasses.field(default_factory=CLIPHFParams)
    do_classifier_free_guidance: bool = False
    guidance_scale: float = 4.0
    dropout_percent: float = 0.2

    @property
    def image_size(self) -> int:
        return self.unet.image_size


@dataclasses.dataclass(frozen=True)
class BackboneParams(ModelParams):
    """Unregistered marker base of the vision-language backbones of ``diffusion_policy``."""


@register_params("clip_backbone")
class CLIPBackboneParams(BackboneParams, CLIPHFParams):
    disable_text: bool = False


@register_params("vlm_backbone")
class VLMBackboneParams(BackboneParams, VLMHFParams):
    num_vlm_layers_to_use: int = 4


@register_params("vlm_foundry_backbone")
class VLMFoundryBackboneParams(BackboneParams):
    num_vlm_layers_to_use: int = 4
    vlm_experiment_dir: str | None = None


@register_params("vit_backbone")
class ViTBackboneParams(BackboneParams, ViTParams):
    pass


@register_params("diffusion_policy")
class DiffusionPolicyParams(ModelParams):
    vision_language_backbone: VLMBackboneParams | CLIPBackboneParams | VLMFoundryBackboneParams | ViTBackboneParams = (
        dataclasses.field(default_factory=CLIPBackboneParams)
    )
    # The original's default is the abstract ModelParams (must always be configured); None says the same here.
    transformer: TransformerParams | TransformerHFParams | None = None
    noise_scheduler: NoiseSchedulerParams = dataclasses.field(default_factory=NoiseSchedulerParams)
    use_diffusers_scheduler: bool = False
    use_flow_matching_scheduler: bool = False
    input_noise_std: float = 0.0
    diffusion_step_conditioning: Literal["add", "concat"] = "concat"
    num_action_head_repeats: int | None = None
    action_dim: int | None = None
    proprioception_dim: int = 0


def submodel_params(params: ModelParams) -> dict[str, ModelParams]:
    """The direct ModelParams children of ``params``, by field name (e.g. ``{'vit': ..., 'transformer': ...}``)."""
    return {
        f.name: getattr(params, f.name)
        for f in dataclasses.fields(params)
        if isinstance(getattr(params, f.name), ModelParams)
    }
