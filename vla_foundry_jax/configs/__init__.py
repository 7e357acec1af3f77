"""Config readers, below the models: where a checkpoint is and what architecture it describes.

* :mod:`.hf_hub` - ``hf_pretrained`` (local directory or hub id) -> local directory; ``AutoConfig`` loading;
* :mod:`.safetensors` - safetensors headers (tensor names, dtypes, shapes; no tensor data);
* one module per model family: the structure dataclass the model is built from and its parser from an HF / timm /
  OpenCLIP / diffusers config (:mod:`.hf_decoder`, :mod:`.hf_vision` with timm, :mod:`.clip` with OpenCLIP,
  :mod:`.vlm_hf` (PaliGemma / Idefics3), :mod:`.diffusers_unet`).

Imports only :mod:`vla_foundry_jax.params` and third-party libraries; models and converters import from here.
"""
