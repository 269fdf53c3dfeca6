"""Backbones, weight loaders (RETFound's real key layout, plain state dicts), configs and the DeepSpeed config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from retina_train.backbones import (
    BACKBONES,
    PAPER_BACKBONES,
    TINY_BACKBONES,
    BackboneError,
    create_backbone,
    load_retfound_checkpoint,
    param_groups,
)
from retina_train.config import ConfigError, RunConfig, config_differences, resolve_config, to_dict
from retina_train.ds_config import build_ds_config


@pytest.mark.parametrize("name", TINY_BACKBONES)
def test_tiny_backbones_forward_backward(name):
    """A BCE backward pass reaches every trainable tensor with a finite, non-zero gradient. ResNet (zero-init last BN
    of each block) and SwinV2 (zero-init residual post-norms) block the gradient of their residual branches until
    those gains have moved, so the check is after one optimizer step; the gains themselves get one from the start."""
    torch.manual_seed(0)
    model = create_backbone(name, image_size=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 64, 64), (torch.rand(4, 11) > 0.7).float()
    for _ in range(2):
        opt.zero_grad()
        out = model(x)
        assert out.shape == (4, 11)
        torch.nn.functional.binary_cross_entropy_with_logits(out, y).backward()
        opt.step()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    without = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum()]
    assert not without, f"no finite non-zero gradient: {without[:8]}"


@pytest.mark.parametrize("name", PAPER_BACKBONES)
def test_paper_backbones_are_the_papers_models(name):
    """Each of the paper's six is built by timm (weights-free, on the meta device) with an 11-class head, at the input
    size timm's pretrained weights were trained at (SwinV2 window 12 at 192 px, EfficientNetV2-M at 384)."""
    spec = BACKBONES[name]
    paper = {"resnet50": (224, "ResNet"), "tf_efficientnetv2_m": (384, "EfficientNet"),
             "convnextv2_base": (224, "ConvNeXt"), "vit_base_patch16_224": (224, "VisionTransformer"),
             "swinv2_base_window12_192": (192, "SwinTransformerV2"),
             "retfound": (224, "VisionTransformer")}  # fmt: skip
    size, cls = paper[name]
    assert spec.image_size == size == timm.models.get_pretrained_cfg(spec.timm_name).input_size[-1]
    with torch.device("meta"):
        model = create_backbone(name)
        assert model(torch.empty(2, 3, size, size)).shape == (2, 11)
    assert type(model).__name__ == cls
    if name == "retfound":  # RETFound: ViT-L/16, global average pooling + fc_norm, no final norm; layer decay 0.65
        assert (model.embed_dim, len(model.blocks), model.patch_embed.patch_size) == (1024, 24, (16, 16))
        assert model.global_pool == "avg" and isinstance(model.fc_norm, torch.nn.LayerNorm)
        assert isinstance(model.norm, torch.nn.Identity) and spec.layer_decay == 0.65


def _fake_retfound_checkpoint(path: Path, *, grid_px: int = 96) -> dict:
    """A RETFound-style MAE checkpoint: encoder + decoder_*, mask_token, norm.*, a 1000-way head, another grid."""
    enc = timm.create_model("vit_large_patch16_224", pretrained=False, patch_size=8, embed_dim=32, depth=2,
                            num_heads=2, img_size=grid_px, num_classes=1000)  # fmt: skip
    sd = {k: v.clone() for k, v in enc.state_dict().items()}  # has norm.*, head.* (1000 classes), no fc_norm
    sd["mask_token"] = torch.zeros(1, 1, 16)
    sd["decoder_embed.weight"] = torch.randn(16, 32)
    sd["decoder_embed.bias"] = torch.zeros(16)
    sd["decoder_pos_embed"] = torch.zeros(1, (grid_px // 8) ** 2 + 1, 16)
    sd["decoder_blocks.0.attn.qkv.weight"] = torch.randn(48, 16)
    sd["decoder_norm.weight"] = torch.ones(16)
    sd["decoder_pred.weight"] = torch.randn(8 * 8 * 3, 16)
    torch.save({"model": sd, "epoch": 799}, path)
    return sd


def test_retfound_loader_on_real_key_layout(tmp_path):
    path = tmp_path / "RETFound_cfp_weights.pth"
    sd = _fake_retfound_checkpoint(path)
    model = create_backbone("tiny_retfound", image_size=64)
    missing, unexpected = load_retfound_checkpoint(model, path)
    assert set(missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert {"norm.weight", "norm.bias", "mask_token", "decoder_embed.weight"} <= set(unexpected)
    assert not any(k.startswith("head.") for k in unexpected), "the pretraining head is dropped, not loaded"
    own = model.state_dict()
    assert torch.equal(own["blocks.1.mlp.fc1.weight"], sd["blocks.1.mlp.fc1.weight"])
    assert own["pos_embed"].shape == (1, 8 * 8 + 1, 32), "positional embedding resampled from a 12x12 grid"
    assert torch.equal(own["pos_embed"][:, 0], sd["pos_embed"][:, 0]), "class token position kept"
    # through the factory, as training uses it
    model2 = create_backbone("tiny_retfound", image_size=64, pretrained_file=path)
    assert torch.equal(model2.state_dict()["patch_embed.proj.weight"], sd["patch_embed.proj.weight"])
    assert model2(torch.randn(1, 3, 64, 64)).shape == (1, 11)


def test_retfound_loader_refuses_other_layouts(tmp_path):
    path = tmp_path / "not_retfound.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, path)
    with pytest.raises(BackboneError, match="not a RETFound checkpoint"):
        create_backbone("tiny_retfound", pretrained_file=path)
    sd = _fake_retfound_checkpoint(tmp_path / "r.pth")
    del sd["blocks.0.attn.qkv.weight"]
    torch.save({"model": sd}, tmp_path / "r.pth")
    with pytest.raises(BackboneError, match="blocks.0.attn.qkv.weight"):
        create_backbone("tiny_retfound", pretrained_file=tmp_path / "r.pth")


def test_untrusted_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "obj": Path("/")}, path)  # a non-tensor object needs full unpickling
    with pytest.raises(BackboneError, match="cannot be read"):
        create_backbone("tiny_retfound", pretrained_file=path)


def test_plain_state_dict_file_with_other_head(tmp_path):
    src = create_backbone("tiny_resnet", num_classes=5)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    model = create_backbone("tiny_resnet", pretrained_file=tmp_path / "w.pth")
    assert torch.equal(model.state_dict()["conv1.0.weight"], src.state_dict()["conv1.0.weight"])
    from safetensors.torch import save_file

    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    model = create_backbone("tiny_resnet", pretrained_file=tmp_path / "w.safetensors")
    assert torch.equal(model.state_dict()["conv1.0.weight"], src.state_dict()["conv1.0.weight"])


def test_unknown_backbone_lists_known():
    with pytest.raises(BackboneError, match="known: resnet50"):
        create_backbone("resnet5000")
    with pytest.raises(BackboneError, match="no pretrained weights"):
        create_backbone("tiny_vit", pretrained="timm")


def test_layer_decay_groups():
    model = create_backbone("tiny_retfound", image_size=64)
    groups = param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.65)
    lrs = sorted({round(g["lr"], 6) for g in groups})
    assert max(lrs) == 1.0 and min(lrs) < 0.65**2, "earlier layers get a smaller lr"
    assert all("lr_scale" not in g for g in groups)


def test_config_resolution_order(tmp_path):
    cfg = resolve_config("tiny_vit")
    assert cfg.data.image_size == 64 and cfg.train.epochs == 4  # from configs/tiny_vit.yaml
    user = tmp_path / "c.yaml"
    user.write_text("train: {epochs: 7}\noptim: {lr: 0.5}\n")
    cfg = resolve_config("tiny_vit", config_file=user, overrides={"optim": {"lr": 0.25}})
    assert cfg.train.epochs == 7 and cfg.optim.lr == 0.25
    assert cfg.data.augment.random_area == (0.7, 1.0)
    with pytest.raises(ConfigError, match="unknown key 'lrr'"):
        resolve_config("tiny_vit", overrides={"optim": {"lrr": 1}})
    a, b = to_dict(resolve_config("tiny_vit")), to_dict(resolve_config("tiny_vit", overrides={"optim": {"lr": 9.0}}))
    assert config_differences(a, b) == ["optim.lr"]
    c = to_dict(resolve_config("tiny_vit", overrides={"train": {"folds": "0"}}))
    assert config_differences(a, c) == [], "running another fold subset is the same run"
    old = to_dict(resolve_config("tiny_vit"))
    del old["data"]["local_contrast"]  # a run written before the option existed (its default is the old behaviour)
    plain = to_dict(resolve_config("tiny_vit", overrides={"data": {"local_contrast": 0.0}}))
    assert config_differences(old, plain) == []
    assert config_differences(old, a) == ["data.local_contrast"], "the tiny config's own value still differs"


def test_config_values_take_the_field_type_or_are_refused():
    # YAML reads 1e-3 as a string; `--set optim.lr=1e-3` must still be 0.001, and bad values named, not crash later
    over = {"optim": {"lr": "1e-3", "betas": [0.9, "0.95"]}, "train": {"epochs": 2}}
    cfg = resolve_config("tiny_vit", overrides=over)
    assert cfg.optim.lr == 0.001 and cfg.optim.betas == (0.9, 0.95) and cfg.train.epochs == 2
    assert resolve_config("tiny_vit", overrides={"data": {"augment": {"gamma": None}}}).data.augment.gamma is None
    assert resolve_config("tiny_vit", overrides={"train": {"folds": 0}}).train.folds == "0"  # --set train.folds=0
    for bad, where in [({"optim": {"lr": "fast"}}, "optim.lr"), ({"train": {"epochs": 2.5}}, "train.epochs"),
                       ({"optim": {"pos_weight": "yes"}}, "optim.pos_weight"),
                       ({"data": {"augment": {"random_area": [0.5]}}}, "data.augment.random_area"),
                       ({"model": {"pretrained": ["timm"]}}, "model.pretrained"),
                       ({"train": {"precision": "bfloat16"}}, "train.precision: must be one of auto, fp32, bf16, fp16"),
                       ({"train": {"device": "gpu"}}, "train.device"),
                       ({"data": {"backend": "pil"}}, "data.backend")]:  # fmt: skip
        with pytest.raises(ConfigError, match=where):
            resolve_config("tiny_vit", overrides=bad)


def test_an_old_run_config_with_renamed_keys_still_reads_and_resumes(tmp_path):
    from retina_train.config import read_run_config

    cfg = resolve_config("tiny_vit", overrides={"data": {"dataset": "shards/x"}})
    old = to_dict(cfg)
    old["data"]["data"] = old["data"].pop("dataset")  # how runs wrote the dataset folder before it was renamed
    assert config_differences(old, to_dict(cfg)) == []
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert read_run_config(tmp_path).data.dataset == "shards/x"
    assert resolve_config("tiny_vit", overrides={"data": {"data": "shards/y"}}).data.dataset == "shards/y"
    with pytest.raises(ConfigError, match="no config.json"):
        read_run_config(tmp_path / "nothing")


def test_deepspeed_config_precision():
    cfg = RunConfig()
    cpu = build_ds_config(cfg, world_size=2, total_steps=100, warmup_steps=10, device="cpu", precision="fp32")
    assert cpu["optimizer"]["params"]["torch_adam"] is True and "torch_autocast" not in cpu and "bf16" not in cpu
    assert cpu["train_batch_size"] == cfg.data.batch_size * 2
    gpu = build_ds_config(cfg, world_size=8, total_steps=100, warmup_steps=10, device="cuda", precision="bf16")
    assert gpu["torch_autocast"]["dtype"] == "bfloat16" and "bf16" not in gpu, "fp32 weights and BatchNorm stats"
    assert gpu["optimizer"]["params"]["torch_adam"] is True and gpu["optimizer"]["params"]["fused"] is True
    fp16 = build_ds_config(cfg, world_size=1, total_steps=100, warmup_steps=10, device="cuda", precision="fp16")
    assert fp16["torch_autocast"]["dtype"] == "float16" and "fp16" not in fp16
    cpu_bf16 = build_ds_config(cfg, world_size=1, total_steps=100, warmup_steps=10, device="cpu", precision="bf16")
    assert cpu_bf16["torch_autocast"]["dtype"] == "bfloat16", "asked for on a CPU: honoured, not silently fp32"
    with pytest.raises(ConfigError, match="precision"):
        build_ds_config(cfg, world_size=1, total_steps=100, warmup_steps=10, device="cpu", precision="fp64")


def test_user_deepspeed_json_must_match_batch(tmp_path):
    cfg = RunConfig()
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3}))
    cfg.train.deepspeed_config = str(path)
    with pytest.raises(ConfigError, match="differs from --batch-size"):
        build_ds_config(cfg, world_size=1, total_steps=10, warmup_steps=1, device="cpu", precision="fp32")
