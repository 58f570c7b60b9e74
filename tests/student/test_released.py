"""``student.released``: a released MoVE-KD checkpoint loads into the project's student and
computes what the released model computes; export back gives the same files.

The "released" model is built here from small torch modules that reproduce the released module
tree and its forward (``moe_lora.py``: ``LoRALayer``, ``MoE_LoRA_CLIP`` with ``original_module``,
``moe_down``/``moe_up``, ``router`` and sparse top-1 routing; ``clip_encoder.py``'s
``CLIPVisionTower.vision_tower`` = transformers-4 ``CLIPVisionModel.vision_model``;
``LlavaMetaModel.mm_projector``; ``move_llava_llama.py``'s ``<teacher>_adapter_1/2``), attached to
a tiny HF ``LlamaForCausalLM`` as ``LlavaMetaModel`` attaches them, so its ``state_dict`` has the
released key names. Nothing here calls the project's code to compute the reference side. The
corruption tests show the comparison is sensitive: two experts or q/k swapped in the file still
load (same shapes) but no longer match.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM

from student.config import TrainConfig
from student.conversation import IMAGE_TOKEN_INDEX
from student.model import build_student
from student.mole import MoLEConfig
from student.released import export_llava, load_released
from student.released_keys import Slot, build_rules, map_released_key
from tests.student._trainer_fixtures import tiny_manifest

HIDDEN, INTER, LAYERS, HEADS, IMAGE, PATCH = 32, 64, 3, 4, 56, 14
EXPERTS, RANK, ALPHA = 3, 4, 1
LLM_DIM, VOCAB = 64, 128
TOL = 2e-5
V = "model.vision_tower.vision_tower.vision_model"
# teacher -> (cached channels, grid) as the project caches them (row-major [B, H*W, C])
TEACHERS = {"eva": (12, (8, 8)), "convnext": (24, (4, 4)), "sam": (32, (8, 8))}


# -- the released module tree, written out ---------------------------------------------------------
class LoRALayer(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.lora_A, self.lora_B = nn.Linear(cin, RANK), nn.Linear(RANK, cout)

    def forward(self, x):
        return self.lora_B(self.lora_A(x)) * (ALPHA / RANK)  # eval: no dropout


class CLIPMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(HIDDEN, INTER), nn.Linear(INTER, HIDDEN)


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class MoELoRACLIP(nn.Module):
    """moe_lora.MoE_LoRA_CLIP, sparse: every token through the top-1 expert of fc1's and fc2's LoRA."""

    def __init__(self):
        super().__init__()
        self.original_module = CLIPMLP()
        self.moe_down = nn.ModuleList(LoRALayer(HIDDEN, INTER) for _ in range(EXPERTS))
        self.moe_up = nn.ModuleList(LoRALayer(INTER, HIDDEN) for _ in range(EXPERTS))
        self.router = nn.Linear(HIDDEN, EXPERTS)
        self.last_index = None

    def _sparse(self, x, proj, index, moe):
        out = proj(x)
        lora = torch.zeros_like(out)
        for e in range(EXPERTS):
            b, t = torch.where(index == e)
            lora[b, t] = moe[e](x[b, t])
        return out + lora

    def forward(self, x):
        index = F.softmax(self.router(x), dim=-1).argmax(-1)
        self.last_index = index
        h = quick_gelu(self._sparse(x, self.original_module.fc1, index, self.moe_down))
        return self._sparse(h, self.original_module.fc2, index, self.moe_up)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.v_proj, self.out_proj = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, HEADS, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        att = (q @ k.transpose(-1, -2) / (HIDDEN // HEADS) ** 0.5).softmax(-1)
        return self.out_proj((att @ v).transpose(1, 2).reshape(b, n, HIDDEN))


class EncoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn, self.layer_norm1 = Attention(), nn.LayerNorm(HIDDEN)
        self.mlp, self.layer_norm2 = MoELoRACLIP(), nn.LayerNorm(HIDDEN)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(HIDDEN))
        self.patch_embedding = nn.Conv2d(3, HIDDEN, PATCH, PATCH, bias=False)
        self.position_embedding = nn.Embedding((IMAGE // PATCH) ** 2 + 1, HIDDEN)

    def forward(self, pixels):
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        return torch.cat([cls, patches], 1) + self.position_embedding.weight


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer() for _ in range(LAYERS))


class VisionTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings, self.pre_layrnorm = Embeddings(), nn.LayerNorm(HIDDEN)
        self.encoder, self.post_layernorm = Encoder(), nn.LayerNorm(HIDDEN)

    def hidden_states(self, pixels):
        states = [self.pre_layrnorm(self.embeddings(pixels))]
        for layer in self.encoder.layers:
            states.append(layer(states[-1]))
        return states


class HFCLIPVisionModel(nn.Module):  # transformers 4.x: CLIPVisionModel.vision_model
    def __init__(self):
        super().__init__()
        self.vision_model = VisionTransformer()


class CLIPVisionTower(nn.Module):  # clip_encoder.CLIPVisionTower.vision_tower
    def __init__(self):
        super().__init__()
        self.vision_tower = HFCLIPVisionModel()


def released_model(seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=LLM_DIM,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(cfg)
    model.model.vision_tower = CLIPVisionTower()  # LlavaMetaModel.__init__
    model.model.mm_projector = nn.Sequential(nn.Linear(HIDDEN, LLM_DIM), nn.GELU(), nn.Linear(LLM_DIM, LLM_DIM))
    tokens = (IMAGE // PATCH) ** 2
    for name, (channels, (h, w)) in TEACHERS.items():  # initialize_teachers
        in_tokens, in_ch = (channels * h // 4, 4 * w) if name == "sam" else (h * w, channels)
        setattr(model, f"{name}_adapter_1", nn.Linear(in_ch, HIDDEN))
        setattr(model, f"{name}_adapter_2", nn.Linear(in_tokens, tokens))
    with torch.no_grad():  # non-zero LoRA biases, so a wrong bias slot shows
        for n, p in model.named_parameters():
            if ".lora_" in n and n.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def released_vision(model, pixels):
    return model.model.vision_tower.vision_tower.vision_model.hidden_states(pixels)


def released_logits(model, ids, pos, pixels):
    """LLaVA's splice for one image per row at position ``pos``: text, image features, text."""
    feats = model.model.mm_projector(released_vision(model, pixels)[-2][:, 1:])
    text = model.model.embed_tokens(ids)
    embeds = torch.cat([text[:, :pos], feats, text[:, pos + 1 :]], 1)
    return model(inputs_embeds=embeds).logits


def released_adapter(model, name, cached, grid):
    """move_llava_llama.py: the teacher's [B, C, H, W] output viewed as tokens, adapter_1, GELU, adapter_2."""
    b, _, c = cached.shape
    token = cached.transpose(1, 2).reshape(b, c, *grid)  # the teacher's output before the view
    if name == "sam":  # sam_encoder.py: flatten(1, 2), square image of W channels, pixel_unshuffle(2)
        flat = token.flatten(1, 2)
        side = int(flat.shape[1] ** 0.5)
        token = F.pixel_unshuffle(flat.transpose(1, 2).reshape(b, flat.shape[2], side, side), 2)
    x = token.view(b, token.size(1), -1).permute(0, 2, 1)
    a1, a2 = getattr(model, f"{name}_adapter_1"), getattr(model, f"{name}_adapter_2")
    return a2(F.gelu(a1(x)).permute(0, 2, 1)).permute(0, 2, 1)


# -- saving it as the released code does -----------------------------------------------------------
def config_json(model, vision_dir) -> dict:
    d = json.loads(model.config.to_json_string(use_diff=True))
    d.pop("rope_parameters", None)
    d.update(
        model_type="move_llava_llama",
        architectures=["MoVELlavaLlamaForCausalLM"],
        rope_theta=10000.0,
        rope_scaling=None,
        torch_dtype="float32",
        mm_vision_tower=str(vision_dir),
        mm_hidden_size=HIDDEN,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_patch_merge_type="flat",
        use_mm_proj=True,
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad",
        tokenizer_padding_side="right",
        tokenizer_model_max_length=2048,
        tune_mm_mlp_adapter=False,
        freeze_mm_mlp_adapter=False,
        mm_projector_lr=None,
        moe={
            "moe_encoder": True,
            "moe_encoder_dense": False,
            "moe_encoder_lora_rank": RANK,
            "moe_encoder_lora_alpha": ALPHA,
            "moe_encoder_num_experts": EXPERTS,
        },
        kd={"kd_mode": True},
    )
    return d


def save_released(folder: Path, state: dict, config: dict, fmt: str = "safetensors") -> Path:
    """HF's save layout: config.json and two shards with an index (safetensors or .bin)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    keys = list(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    ext, index = ("safetensors", "model.safetensors.index.json") if fmt == "safetensors" else ("bin", None)
    index = index or "pytorch_model.bin.index.json"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, part in enumerate(halves, 1):
        name = f"{stem}-0000{i}-of-00002.{ext}"
        shard = {k: state[k].contiguous().clone() for k in part}
        if fmt == "safetensors":
            save_file(shard, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(shard, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    vision_dir = root / "clip"  # LLaVA rebuilds the tower from mm_vision_tower: only its config matters
    CLIPVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=IMAGE,
        patch_size=PATCH,
    ).save_pretrained(vision_dir)
    model = released_model()
    state = model.state_dict()
    config = config_json(model, vision_dir)
    st = save_released(root / "st", state, config)
    bins = save_released(root / "bin", state, config, fmt="bin")
    return {"root": root, "model": model, "state": state, "config": config, "st": st, "bin": bins, "vision": vision_dir}


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=g)
    ids = torch.randint(4, VOCAB, (2, 7), generator=g)
    return pixels, ids


def compare(released, project, pos=2) -> dict[str, float]:
    """Largest |released - project| of the select-layer hidden states, projector output, logits, adapters."""
    pixels, ids = inputs()
    with torch.no_grad():
        states = released_vision(released, pixels)
        out = project.vision_tower(pixels, output_hidden_states=True).hidden_states
        patches, projected = project.llava.encode_images(pixels)
        sentinel = ids.clone()
        sentinel[:, pos] = IMAGE_TOKEN_INDEX
        logits = project.llava(input_ids=sentinel, pixel_values=pixels)["logits"]
        diffs = {
            "hidden[-2]": (states[-2] - out[-2]).abs().max().item(),
            "hidden[all]": max((a - b).abs().max().item() for a, b in zip(states, out)),
            "projector": (released.model.mm_projector(states[-2][:, 1:]) - projected).abs().max().item(),
            "logits": (released_logits(released, ids, pos, pixels) - logits).abs().max().item(),
        }
        g = torch.Generator().manual_seed(2)
        for name, (channels, grid) in TEACHERS.items():
            cached = torch.randn(2, grid[0] * grid[1], channels, generator=g)
            ref = released_adapter(released, name, cached, grid)
            diffs[f"adapter/{name}"] = (ref - project.adapters[name](cached)).abs().max().item()
    return diffs


# -- tests ------------------------------------------------------------------------------------------
def test_key_map_examples():
    rules = build_rules("mlp2x_gelu", ("eva",))
    cases = {
        f"{V}.encoder.layers.5.mlp.original_module.fc1.weight": (
            "llava.vision_tower.encoder.layers.5.mlp.fc1.weight",
            "all",
            0,
        ),
        f"{V}.encoder.layers.0.mlp.moe_down.2.lora_A.weight": (
            "llava.vision_tower.encoder.layers.0.mlp.lora_fc1.A",
            "rows",
            2,
        ),
        f"{V}.encoder.layers.0.mlp.moe_up.1.lora_B.weight": (
            "llava.vision_tower.encoder.layers.0.mlp.lora_fc2.B",
            "cols",
            1,
        ),
        f"{V}.encoder.layers.0.mlp.moe_up.2.lora_B.bias": (
            "llava.vision_tower.encoder.layers.0.mlp.lora_fc2.b_bias",
            "row",
            2,
        ),
        f"{V}.encoder.layers.3.self_attn.q_proj.weight": (
            "llava.vision_tower.encoder.layers.3.self_attn.q_proj.weight",
            "all",
            0,
        ),
        f"{V}.post_layernorm.bias": ("llava.vision_tower.post_layernorm.bias", "all", 0),
        "model.mm_projector.2.weight": ("llava.projector.2.weight", "all", 0),
        "eva_adapter_2.bias": ("adapters.eva.token_proj.bias", "all", 0),
        "model.layers.1.mlp.gate_proj.weight": ("llava.llm.model.layers.1.mlp.gate_proj.weight", "all", 0),
        "lm_head.weight": ("llava.llm.lm_head.weight", "all", 0),
    }
    for key, (name, kind, index) in cases.items():
        got_name, slot = map_released_key(key, rules, rank=32)
        assert (got_name, slot.kind, slot.index) == (name, kind, index), key
    assert map_released_key("model.mm_projector.weight", build_rules("linear"), 32)[0] == "llava.projector.0.weight"
    t = torch.arange(24.0).view(4, 6)
    assert torch.equal(Slot("cols", 1, 2).view(t), t[:, 2:4]) and torch.equal(Slot("rows", 1, 2).view(t), t[2:4])


@pytest.mark.parametrize("fmt", ["st", "bin"])
def test_released_checkpoint_computes_what_the_released_model_computes(world, fmt):
    project = load_released(world[fmt])
    diffs = compare(world["model"], project)
    print(fmt, {k: f"{v:.2e}" for k, v in diffs.items()})
    assert max(diffs.values()) < TOL, diffs
    routed = [layer.mlp.last_index for layer in released_vision_layers(world["model"])]
    assert all(len(idx.unique()) > 1 for idx in routed), "the tokens must spread over experts for this to test them"
    assert project.teachers == ("clip", "sam", "eva", "convnext") and project.adapters["sam"].layout == "released_sam"
    assert (project.mole_config.num_experts, project.mole_config.rank) == (EXPERTS, RANK)


def released_vision_layers(model):
    return model.model.vision_tower.vision_tower.vision_model.encoder.layers


def _swap(state, a, b):
    state = dict(state)
    state[a], state[b] = state[b], state[a]
    return state


@pytest.mark.parametrize(
    "what,a,b",
    [
        (
            "experts",
            f"{V}.encoder.layers.0.mlp.moe_down.0.lora_B.weight",
            f"{V}.encoder.layers.0.mlp.moe_down.1.lora_B.weight",
        ),
        ("q/k", f"{V}.encoder.layers.1.self_attn.q_proj.weight", f"{V}.encoder.layers.1.self_attn.k_proj.weight"),
    ],
)
def test_the_comparison_catches_a_wrong_map(world, tmp_path, what, a, b):
    folder = save_released(tmp_path / "bad", _swap(world["state"], a, b), world["config"])
    diffs = compare(world["model"], load_released(folder))
    assert diffs["hidden[-2]"] > 1e-3 and diffs["logits"] > 1e-4, (what, diffs)


def test_an_unexpected_key_is_named(world, tmp_path):
    extra = f"{V}.encoder.layers.0.mlp.moe_down.3.lora_A.weight"  # a 4th expert the config does not have
    state = {**world["state"], extra: torch.zeros(RANK, HIDDEN)}
    folder = save_released(tmp_path / "extra", state, world["config"])
    with pytest.raises(ValueError, match=r"unexpected key.*moe_down\.3\.lora_A\.weight"):
        load_released(folder)


def test_a_missing_key_is_named(world, tmp_path):
    state = {k: v for k, v in world["state"].items() if k != "model.mm_projector.2.bias"}
    folder = save_released(tmp_path / "missing", state, world["config"])
    with pytest.raises(ValueError, match=r"missing key.*model\.mm_projector\.2\.bias"):
        load_released(folder)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("mm_projector_type", "identity", "mm_projector_type"),
        ("mm_use_im_start_end", True, "mm_use_im_start_end"),
        ("mm_vision_select_feature", "cls_patch", "mm_vision_select_feature"),
        ("model_type", "llava_llama", "model_type"),
        ("mystery_setting", 3, "mystery_setting"),
    ],
)
def test_incompatible_config_fields_are_refused_by_name(world, tmp_path, field, value, match):
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**world["config"], field: value}))
    with pytest.raises(ValueError, match=match):
        load_released(folder)


def test_dense_moe_is_refused(world, tmp_path):
    folder = tmp_path / "dense"
    folder.mkdir()
    moe = {**world["config"]["moe"], "moe_encoder_dense": True}
    (folder / "config.json").write_text(json.dumps({**world["config"], "moe": moe}))
    with pytest.raises(ValueError, match="moe.moe_encoder_dense"):
        load_released(folder)


def test_a_bin_that_needs_pickle_is_refused(world, tmp_path):
    folder = tmp_path / "pickle"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(world["config"]))
    torch.save({"x": torch.zeros(1), "obj": Path("/")}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_released(folder)


def test_export_llava_round_trip_gives_the_released_files_back(world, tmp_path):
    project = load_released(world["st"])
    out = export_llava(project, tmp_path / "llava", str(world["vision"]), max_shard_bytes=64 * 1024)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    again = load_released(out)
    a, b = project.state_dict(), again.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    from safetensors.torch import load_file

    written = {}
    for f in out.glob("model-*.safetensors"):
        written.update(load_file(str(f)))
    assert set(written) == set(world["state"])  # exactly the released key names
    assert all(torch.equal(written[k], world["state"][k]) for k in written)
    config = json.loads((out / "config.json").read_text())
    for field in ("model_type", "mm_projector_type", "mm_vision_select_layer", "mm_hidden_size", "moe", "rope_theta"):
        assert config[field] == world["config"][field], field


def test_train_init_from_released(world):
    cfg = TrainConfig(
        vision_tower=str(world["vision"]),
        init_from_released=str(world["st"]),
        mole=MoLEConfig(rank=RANK, num_experts=EXPERTS),
    )
    model = build_student(cfg, tiny_manifest())
    assert model.teachers == ("clip", "eva", "convnext") and set(model.adapters) == {"eva", "convnext"}
    loaded = load_released(world["st"])
    want = loaded.state_dict()
    got = model.state_dict()
    assert set(got) <= set(want) and all(torch.equal(got[k], want[k]) for k in got)
    assert any(p.requires_grad for p in model.llava.projector.parameters())  # stage-1 trainables set
    assert not any(p.requires_grad for p in model.llava.llm.parameters())


def test_train_init_from_released_refuses_other_mole_shapes(world):
    cfg = TrainConfig(vision_tower=str(world["vision"]), init_from_released=str(world["st"]), mole=MoLEConfig(rank=8))
    with pytest.raises(ValueError, match="moe_encoder_lora_rank"):
        build_student(cfg, tiny_manifest())


def test_cli_export_converts_both_ways(world, tmp_path):
    """``movekd export``: released -> project format (default), then -> the released layout again."""
    from jobs.cli import main
    from student.export import load_pretrained

    ours, llava = tmp_path / "movekd", tmp_path / "llava"
    assert main(["export", str(world["st"]), str(ours)]) == 0
    assert compare(world["model"], load_pretrained(ours))["logits"] < TOL
    argv = ["export", str(ours), str(llava), "--format", "llava", "--mm-vision-tower", str(world["vision"])]
    assert main(argv) == 0
    from safetensors.torch import load_file

    written = load_file(str(llava / "model.safetensors"))
    assert set(written) == set(world["state"]) and all(torch.equal(written[k], world["state"][k]) for k in written)
    config = json.loads((llava / "config.json").read_text())
    assert config["image_aspect_ratio"] == "pad" and config["mm_vision_tower"] == str(world["vision"])


def test_cli_export_refuses_a_folder_that_is_neither(tmp_path, capsys):
    from jobs.cli import main

    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "neither a movekd export" in capsys.readouterr().err


def test_train_flag_sets_init_from_released(world):
    import argparse

    from jobs.train import add_arguments, resolve_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = resolve_config(parser.parse_args(["--config", "train_v1_0_pretrain", "--init-from-released", "R"]))
    assert cfg.init_from_released == "R" and cfg.tokenizer_path == "R"
    with pytest.raises(ValueError, match="exclusive"):
        TrainConfig(init_from="A", init_from_released="R")
