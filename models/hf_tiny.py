"""Tiny random-init `transformers` models as exporters write them, for the dynamic-shape tests of
the TVM backend and the zoo (tests/test_zoo.py): decoders (LLaMA with grouped key/value heads,
GPT-2 with its tied output projection, Qwen2 with q/k/v biases) returning logits from `input_ids`
(no KV cache), a BERT encoder returning hidden states, and image classifiers (ConvNeXt, ViT,
ResNet, MobileNetV2). Built from configs, nothing downloaded; seeded.

`build(name)` -> (torch module, example inputs); `capture(name, dynamic=True)` -> the canonical
IR through `lpcompile.capture`, decoders with symbolic `batch` and `seq`, ConvNeXt with a
symbolic `batch`. `feeds(name, rng, batch, length)` draws inputs of a given size.

    python -m models.hf_tiny gpt2 out.onnx        # from the repository root
"""

from __future__ import annotations

import sys

import numpy as np

VOCAB = 256
DECODERS = ("llama-gqa", "gpt2", "qwen2")
ENCODERS = ("bert",)  # token ids -> hidden states
CONVNETS = ("convnext-tiny",)
ZOO_IMAGES = ("vit", "resnet", "mobilenet-v2")  # the zoo's image models (issue 11 item 4)
IMAGES = CONVNETS + ZOO_IMAGES
TOKENS = DECODERS + ENCODERS
NAMES = DECODERS + CONVNETS
ZOO = DECODERS + ENCODERS + IMAGES
IMAGE = 32  # ConvNeXt input side: its last stage sees 1x1 maps (a depthwise conv GEMV-shaped)


def _module(name: str):
    import transformers

    small = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if name == "llama-gqa":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**small))
    if name == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**small))
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                                    n_positions=128))
    if name == "bert":
        return transformers.BertModel(transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128), add_pooling_layer=False)
    if name == "vit":
        return transformers.ViTForImageClassification(transformers.ViTConfig(
            image_size=IMAGE, patch_size=8, num_channels=3, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_labels=10))
    if name == "resnet":
        return transformers.ResNetForImageClassification(transformers.ResNetConfig(
            num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
            layer_type="basic", num_labels=10))
    if name == "mobilenet-v2":
        return transformers.MobileNetV2ForImageClassification(transformers.MobileNetV2Config(
            num_channels=3, image_size=IMAGE, depth_multiplier=0.5, num_labels=10))
    if name == "convnext-tiny":
        return transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
            num_channels=3, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10, image_size=IMAGE))
    raise ValueError(f"unknown model {name!r}; one of {', '.join(ZOO)}")


def build(name: str, seed: int = 0):
    """(module returning one tensor, example inputs) for `name`."""
    import torch

    torch.manual_seed(seed)
    inner = _module(name).eval()
    decoder = name in DECODERS
    if decoder:
        inner.config.use_cache = False
    if name in IMAGES and name != "convnext-tiny":
        _lively_batchnorm(inner, seed)

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = inner

        def forward(self, x):
            if decoder:
                return self.m(input_ids=x, use_cache=False).logits
            if name in ENCODERS:
                return self.m(input_ids=x).last_hidden_state
            return self.m(pixel_values=x).logits

    # batch 2 in the example: torch.export specializes a dim of size 1
    example = torch.randint(0, VOCAB, (2, 8)) if name in TOKENS else torch.randn(2, 3, IMAGE, IMAGE)
    return Logits().eval(), (example,)


def _lively_batchnorm(module, seed: int) -> None:
    """BatchNorm statistics measured on random images (the running mean and variance of a
    forward pass in training mode) and random affine parameters: with the defaults (mean 0, var 1,
    gamma 1, beta 0) a random-init CNN's activations grow block by block until ReLU6 clips them
    all, and its logits are the same for every input (issue 11: random MobileNet in int8 measured
    'cosine 1.0'), which measures nothing."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass
        with torch.no_grad():
            m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    module.train()
    with torch.no_grad():
        module(pixel_values=torch.randn(16, 3, IMAGE, IMAGE, generator=g))
    module.eval()


def capture(name: str, dynamic: bool = True):
    """The canonical IR of `name`, decoders with symbolic batch and seq, convnets symbolic batch."""
    import lpcompile

    module, example = build(name)
    dims = (["batch", "seq"] if name in TOKENS else {"x": {0: "batch"}}) if dynamic else None
    return lpcompile.capture(module, example, dynamic=dims)


def feeds(name: str, rng: np.random.Generator, batch: int, length: int = 8) -> dict[str, np.ndarray]:
    """Inputs for the captured model: token ids [batch, length] or images [batch, 3, IMAGE, IMAGE]."""
    if name in TOKENS:
        return {"x": rng.integers(0, VOCAB, (batch, length)).astype(np.int64)}
    return {"x": rng.standard_normal((batch, 3, IMAGE, IMAGE)).astype(np.float32)}


def main(argv: list[str] | None = None) -> int:
    import onnx_ir as ir

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ZOO:
        print(f"usage: python -m models.hf_tiny {{{','.join(ZOO)}}} OUT.onnx", file=sys.stderr)
        return 2
    ir.save(capture(args[0]), args[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
