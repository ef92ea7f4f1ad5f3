"""Real architectures from common libraries (small configs, random weights, no downloads):
every sampled parameter on the batched path, and K equal to the float64 reference."""

import pytest
import torch

import tangent_kernels as tk
from conftest import rel_err

transformers = pytest.importorskip("transformers", reason="transformers is one of the test tools (Makefile TOOLS)")


def _text_batch(n=5, length=7, vocab=100):
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, 5:] = 0  # padding: right-padded rows of different lengths
    mask[3, 3:] = 0
    return ids, mask


def _last_logit(out):
    return out.logits[:, -1, 0]


def _bert():
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=16, num_labels=3)
    ids, mask = _text_batch()
    return transformers.BertForSequenceClassification(config), {"input_ids": ids, "attention_mask": mask}, "first"


def _gpt2():
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    ids, _ = _text_batch()
    return transformers.GPT2LMHeadModel(config), {"input_ids": ids}, _last_logit


def _llama():
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                      max_position_embeddings=16)
    ids, mask = _text_batch()
    return transformers.LlamaForCausalLM(config), {"input_ids": ids, "attention_mask": mask}, _last_logit


def _t5():
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_heads=2)
    ids, mask = _text_batch()
    return (transformers.T5EncoderModel(config), {"input_ids": ids, "attention_mask": mask},
            lambda out: out.last_hidden_state[:, 0, 0])


def _torchvision_vit():
    import torchvision

    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=48, num_classes=3)
    return model, torch.randn(5, 3, 16, 16), "first"


def _timm_vit():
    timm = pytest.importorskip("timm", reason="timm is one of the test tools (Makefile TOOLS)")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, num_classes=3, init_values=0.1)  # with layer scale
    return model, torch.randn(5, 3, 32, 32), "first"


def _roberta():  # position ids computed from the data, a gather with keyword arguments
    config = transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=48, max_position_embeddings=20, pad_token_id=1)
    ids, mask = _text_batch()
    return transformers.RobertaForSequenceClassification(config), {"input_ids": ids, "attention_mask": mask}, "first"


def _albert():  # one layer's weights shared by every layer
    config = transformers.AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                                       num_attention_heads=2, intermediate_size=48, max_position_embeddings=16)
    ids, mask = _text_batch()
    return transformers.AlbertForSequenceClassification(config), {"input_ids": ids, "attention_mask": mask}, "first"


def _timm_swin():  # windows flattened into the batch dim, a relative-position bias table
    timm = pytest.importorskip("timm", reason="timm is one of the test tools (Makefile TOOLS)")
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=16,
                              depths=(1, 1), num_heads=(1, 2), num_classes=3)
    return model, torch.randn(5, 3, 56, 56), "first"


def _timm_deit_distilled():  # class and distillation tokens
    timm = pytest.importorskip("timm", reason="timm is one of the test tools (Makefile TOOLS)")
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2, num_classes=3)
    return model, torch.randn(5, 3, 32, 32), "first"


MODELS = {"bert": _bert, "gpt2-tied": _gpt2, "llama-tied": _llama, "t5-encoder": _t5,
          "torchvision-vit": _torchvision_vit, "timm-vit": _timm_vit, "roberta": _roberta, "albert-shared": _albert,
          "timm-swin": _timm_swin, "timm-deit-distilled": _timm_deit_distilled}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("sampled", [None, 3000])
def test_real_architectures_are_batched_and_exact(name, sampled):
    torch.manual_seed(1)
    model, batch, output = MODELS[name]()
    model.eval()
    idx = None if sampled is None else tk.subsample(model, sampled, seed=2)
    report = tk.coverage(model, batch, idx, output=output)
    assert report.generic == [], str(report)
    ref = tk.reference.gram_autograd(model, [batch], idx, output=output)
    K = tk.gram(model, [batch], idx, output=output, precision="fp64", progress=False)
    assert rel_err(K, ref) <= 1e-10
    # fp32: rounding through two attention layers; 1e-4 is about 100x what was measured.
    K32 = tk.gram(model, [batch], idx, output=output, progress=False)
    assert rel_err(K32, ref) <= 1e-4


@pytest.mark.parametrize("name", list(MODELS))
def test_real_architectures_with_every_eligible_tensor_structured(name):
    """structured="always": every whole weight from its factors, and the biases its uses
    add (absorbed: x.x' + 1), on real architectures: K against the float64 reference."""
    torch.manual_seed(1)
    model, batch, output = MODELS[name]()
    model.eval()
    report = tk.coverage(model, batch, output=output, structured="always")
    assert report.structured and report.generic == [], str(report)
    ref = tk.reference.gram_autograd(model, [batch], output=output)
    K = tk.gram(model, [batch], output=output, precision="fp64", progress=False, structured="always")
    assert rel_err(K, ref) <= 1e-10
