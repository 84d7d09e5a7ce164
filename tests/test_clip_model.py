"""The flax CLIP model: open_clip configs, real-size shapes, key layouts, training hooks."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dalle_mini.checkpoint import count_params
from dalle_mini.hub import CheckpointError
from dalle_mini.models.clip import (
    CLIP,
    PRESETS,
    CLIPConfig,
    TextConfig,
    VisionConfig,
    contrastive_loss,
    init_params,
    param_shapes,
)
from dalle_mini.models.clip_weights import params_from_state_dict
from dalle_mini.scoring import CLIPScorer

FIXTURE = Path(__file__).parent / "fixtures" / "clip-vit"
# open_clip's zoo configs (model_configs/ViT-B-32.json, ViT-L-14.json) as hub folders hold them.
VIT_B_32_CFG = {
    "embed_dim": 512,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
}
VIT_L_14_CFG = {
    "embed_dim": 768,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 768,
        "heads": 12,
        "layers": 12,
    },
}
TINY = CLIPConfig(
    embed_dim=16,
    vision=VisionConfig(image_size=16, patch_size=8, width=32, layers=1, head_width=16),
    text=TextConfig(context_length=77, width=16, heads=2, layers=1),
)


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURE / "reference.npz"))


def fixture_model_cfg():
    return json.loads((FIXTURE / "open_clip_config.json").read_text())["model_cfg"]


def test_vit_b_32_has_open_clips_parameter_count():
    config = CLIPConfig.from_open_clip(VIT_B_32_CFG)
    assert config == PRESETS["ViT-B-32"]
    shapes = param_shapes(config)  # jax.eval_shape: nothing is allocated
    assert count_params(shapes) == 151_277_313
    assert shapes["visual"]["conv1"]["kernel"].shape == (32, 32, 3, 768)
    assert shapes["visual"]["positional_embedding"].shape == (50, 768)
    assert shapes["visual"]["transformer"]["resblocks_11"]["attn"]["in_proj"]["kernel"].shape == (
        768,
        2304,
    )
    assert shapes["transformer"]["resblocks_11"]["mlp"]["c_fc"]["kernel"].shape == (512, 2048)
    assert shapes["text_projection"].shape == (512, 512)


def test_vit_l_14_builds_from_its_open_clip_config():
    config = CLIPConfig.from_open_clip(VIT_L_14_CFG)
    assert config == PRESETS["ViT-L-14"]
    assert config.vision.num_heads == 16 and config.vision.grid_size == 16
    assert count_params(param_shapes(config)) == 427_616_513  # open_clip: 427.62M


def test_config_round_trips_through_open_clip_format():
    for config in (*PRESETS.values(), TINY, CLIPConfig.from_open_clip(fixture_model_cfg())):
        assert CLIPConfig.from_open_clip(config.to_open_clip()) == config
    with_eps = CLIPConfig.from_open_clip(
        {**VIT_B_32_CFG, "vision_cfg": {**VIT_B_32_CFG["vision_cfg"], "norm_kwargs": {"eps": 1e-6}}}
    )
    assert with_eps.vision.layer_norm_eps == 1e-6 and with_eps.text.layer_norm_eps == 1e-5
    assert CLIPConfig.from_open_clip(with_eps.to_open_clip()) == with_eps


@pytest.mark.parametrize(
    ("tower", "option", "value"),
    [
        ("vision_cfg", "ls_init_value", 1e-5),
        ("text_cfg", "ls_init_value", 1e-5),
        ("text_cfg", "proj_bias", True),
        ("vision_cfg", "attentional_pool", True),
        ("text_cfg", "hf_model_name", "roberta-base"),
        ("vision_cfg", "layers", [3, 4, 6, 3]),
        ("vision_cfg", "qk_norm", True),
        ("text_cfg", "tokenizer_kwargs", {"clean": "canonicalize"}),
        (None, "init_logit_bias", -10.0),
    ],
)
def test_unsupported_options_are_refused_by_name(tower, option, value):
    model_cfg = json.loads(json.dumps(VIT_B_32_CFG))
    (model_cfg[tower] if tower else model_cfg)[option] = value
    with pytest.raises(CheckpointError, match=rf"{option}.*backend='open_clip'"):
        CLIPConfig.from_open_clip(model_cfg)


def test_options_at_their_defaults_are_accepted():
    model_cfg = json.loads(json.dumps(VIT_B_32_CFG))
    model_cfg["vision_cfg"].update(
        ls_init_value=None, pool_type="tok", patch_dropout=0.0, output_tokens=False
    )
    model_cfg["text_cfg"].update(
        proj_bias=False, pool_type="argmax", embed_cls=False, tokenizer_kwargs={"clean": "lower"}
    )
    model_cfg.update(custom_text=True, cast_dtype=None, init_logit_bias=None)
    assert CLIPConfig.from_open_clip(model_cfg) == PRESETS["ViT-B-32"]


def test_custom_text_clip_key_layout_loads(tmp_path, ref):
    state = load_file(FIXTURE / "open_clip_model.safetensors")
    text_keys = (
        "token_embedding",
        "positional_embedding",
        "transformer",
        "ln_final",
        "text_projection",
    )
    custom = {(f"text.{k}" if k.startswith(text_keys) else k): v for k, v in state.items()}
    custom["logit_scale"] = custom["logit_scale"].reshape(1)  # some checkpoints store (1,)
    assert "text.transformer.resblocks.0.attn.in_proj_weight" in custom and "visual.proj" in custom
    shutil.copy(FIXTURE / "open_clip_config.json", tmp_path)
    save_file(custom, str(tmp_path / "open_clip_model.safetensors"))
    scorer = CLIPScorer.from_pretrained(tmp_path)
    np.testing.assert_allclose(
        scorer.encode_tokens(ref["text_tokens"]), ref["text_features"], atol=1e-4
    )


def test_mismatched_weights_name_the_offending_keys():
    state = load_file(FIXTURE / "open_clip_model.safetensors")
    config = CLIPConfig.from_open_clip(fixture_model_cfg())
    del state["visual.ln_post.bias"]
    state["logit_bias"] = np.zeros((), np.float32)
    with pytest.raises(
        CheckpointError, match=r"1 missing: visual/ln_post/bias.*1 unused: logit_bias"
    ):
        params_from_state_dict(state, config, "test weights")
    wrong = dataclasses.replace(config, embed_dim=64)
    with pytest.raises(CheckpointError, match="mis-shaped: text_projection"):
        params_from_state_dict(load_file(FIXTURE / "open_clip_model.safetensors"), wrong)


def test_gelu_configs_use_exact_gelu(ref):
    """quick_gelu false/absent (LAION ViT-B-32 style) switches both towers to erf GELU."""
    model_cfg = fixture_model_cfg()
    del model_cfg["quick_gelu"]
    config = CLIPConfig.from_open_clip(model_cfg)
    assert not config.use_quick_gelu
    params = params_from_state_dict(load_file(FIXTURE / "open_clip_model.safetensors"), config)
    scorer = CLIPScorer.from_params(config, params)  # jitted encoders
    image_features = scorer.encode_pixels(ref["pixel_values"].transpose(0, 2, 3, 1))
    text_features = scorer.encode_tokens(ref["text_tokens"])
    # the README records that the other activation moves the features by up to ~3.3e-2,
    # far beyond the 1e-6 agreement with QuickGELU
    assert 1e-3 < np.abs(np.asarray(image_features) - ref["image_features"]).max() < 0.1
    assert 2e-2 < np.abs(np.asarray(text_features) - ref["text_features"]).max() < 0.1


def test_fresh_clip_trains_and_saves(tmp_path):
    params = init_params(TINY, jax.random.PRNGKey(0))
    assert count_params(params) == count_params(param_shapes(TINY))
    rng = np.random.default_rng(0)
    pixels = jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)
    tokens = jnp.asarray(CLIPScorer.from_params(TINY, params).tokenize(["a", "b c", "d e f", "g"]))

    @jax.jit
    @jax.value_and_grad
    def loss_and_grads(p):
        return contrastive_loss(*CLIP(TINY).apply({"params": p}, pixels, tokens))

    loss, grads = loss_and_grads(params)
    assert np.isfinite(loss)
    for path in (("visual", "conv1", "kernel"), ("token_embedding", "embedding"), ("logit_scale",)):
        leaf = grads
        for part in path:
            leaf = leaf[part]
        assert np.abs(np.asarray(leaf)).max() > 0, path
    stepped = jax.tree.map(lambda p, g: np.asarray(p) - 0.1 * np.asarray(g), params, grads)
    assert loss_and_grads(stepped)[0] < loss

    scorer = CLIPScorer.from_params(TINY, stepped)
    scorer.save_pretrained(tmp_path)
    reloaded = CLIPScorer.from_pretrained(tmp_path)
    images = rng.integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        reloaded.score("b c", images), scorer.score("b c", images), atol=1e-5
    )


def test_contrastive_loss_takes_wrong_images_that_each_caption_must_score_below_its_own():
    texts = jnp.eye(3)[:2]  # two captions
    own = jnp.eye(3)[:2]  # their images
    plain = contrastive_loss(own, texts, 10.0)
    unlike = contrastive_loss(jnp.concatenate([own, jnp.eye(3)[2:]]), texts, 10.0, count=2)
    alike = contrastive_loss(jnp.concatenate([own, texts[:1]]), texts, 10.0, count=2)
    # a wrong image unlike every caption costs little; one as alike as the caption's own, a lot
    assert plain < unlike < plain + 0.01 < alike
    # extra captions and extra images together: both sides' rows beyond count are wrong ones
    both = contrastive_loss(jnp.concatenate([own, texts[:1]]), jnp.eye(3), 10.0, count=2)
    assert both > alike


def test_bfloat16_scores_stay_close(ref):
    scorer = CLIPScorer.from_pretrained(FIXTURE, dtype=jnp.bfloat16)
    assert scorer.params["visual"]["proj"].dtype == jnp.bfloat16
    scores = scorer.score("an armchair in the shape of an avocado", ref["images_uint8"])
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, ref["logits_per_text"][0], atol=0.3)
