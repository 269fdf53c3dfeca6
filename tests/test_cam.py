"""Grad-CAM for retina-predict --cam: every backbone family gets a spatial map, the combination follows the
meta-learner's weights, and a trained model's map follows the procedural lesion that defines its class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retina_io.schema import CLASSES
from retina_train.backbones import TINY_BACKBONES, create_backbone, get_spec
from retina_train.cam import MIN_GRID, backbone_maps, cam_layer, combine

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.mark.parametrize("name", TINY_BACKBONES)
def test_every_family_gets_a_spatial_map(name):
    torch.manual_seed(0)
    model = create_backbone(name, image_size=64).eval()
    family = get_spec(name).family
    layers, reshape = cam_layer(model, family, 64)
    seen = []
    hook = layers[0].register_forward_hook(lambda _m, _i, o: seen.append((reshape or (lambda t: t))(o).shape) and None)
    model(torch.zeros(1, 3, 64, 64))
    hook.remove()
    assert len(seen[0]) == 4 and min(seen[0][-2:]) >= MIN_GRID or family in ("vit", "retfound")
    maps = backbone_maps([model, model], family, torch.randn(3, 3, 64, 64), [0, 5, 7], 32)
    assert maps.shape == (3, 32, 32) and np.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    # a random model's class evidence can be negative everywhere (an all-zero map after Grad-CAM's ReLU); a map
    # that is not zero must vary over the image: the layer keeps a spatial grid
    assert any(m.std() > 0.01 for m in maps)
    assert all(m.std() > 0.01 for m in maps if m.max() > 0), "a map without spatial variation"


def test_combination_follows_the_weights():
    a, b = np.zeros((1, 4, 4)), np.zeros((1, 4, 4))
    a[0, 0, 0], b[0, 3, 3] = 0.5, 1.0
    maps = np.stack([a, b])
    only_a = combine(maps, np.array([[1.0, 0.0]]))
    assert only_a[0, 0, 0] == 1.0 and only_a[0, 3, 3] == 0.0
    mostly_b = combine(maps, np.array([[0.2, 0.8]]))
    assert mostly_b[0, 3, 3] == 1.0 and 0 < mostly_b[0, 0, 0] < 0.2
    assert not combine(np.zeros((2, 1, 4, 4)), np.array([[0.5, 0.5]])).any()


def _render(seed: int, crp: int, side: str) -> np.ndarray:
    from retina_io.synth.render import render_fundus

    return np.asarray(render_fundus({"CRP": crp, "eye_side": side}, size=64, seed=seed), np.float32) / 255.0


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((images - MEAN) / STD).transpose(0, 3, 1, 2).copy())


def test_map_follows_the_procedural_lesion():
    """A tiny ResNet trained to see CRP (chorioretinal scars, drawn at random places per seed) gets Grad-CAM maps
    that sit on each image's own scars: the generator draws CRP from its own stream, so rendering the same seed with
    and without CRP gives the exact lesion mask."""
    c = CLASSES.index("CRP")
    rng = np.random.default_rng(0)
    n = 192
    labels = np.arange(n) % 2
    sides = np.where(rng.random(n) < 0.5, "left", "right")
    x = _tensor(np.stack([_render(1000 + i, int(labels[i]), sides[i]) for i in range(n)]))
    y = torch.tensor(labels, dtype=torch.float32)
    torch.manual_seed(0)
    model = create_backbone("tiny_resnet", image_size=64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(5):
        for idx in torch.randperm(n).split(32):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[idx])[:, c], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    t = 32
    pos = np.stack([_render(5000 + i, 1, ("left", "right")[i % 2]) for i in range(t)])
    neg = np.stack([_render(5000 + i, 0, ("left", "right")[i % 2]) for i in range(t)])
    masks = np.abs(pos - neg).sum(-1) > 0.05  # where the scars are
    assert 0.01 < masks.mean() < 0.2
    with torch.no_grad():
        p_pos = torch.sigmoid(model(_tensor(pos))[:, c]).numpy()
        p_neg = torch.sigmoid(model(_tensor(neg))[:, c]).numpy()
    assert (p_pos[:, None] > p_neg[None, :]).mean() > 0.9, "the model did not learn CRP; the test says nothing"
    maps = backbone_maps([model], "resnet", _tensor(pos), [c] * t, 64)
    drawn = [i for i in range(t) if maps[i].max() > 0]  # Grad-CAM's ReLU can leave a map at zero
    assert len(drawn) >= 0.75 * t

    def corr(a, b):
        return float(np.corrcoef(a.ravel(), b.ravel().astype(np.float64))[0, 1])

    own = np.mean([corr(maps[i], masks[i]) for i in drawn])
    other = np.mean([corr(maps[i], masks[(i + 1) % t]) for i in drawn])  # another image's scars
    inside = np.mean([(maps[i] * masks[i]).sum() / maps[i].sum() / masks[i].mean() for i in drawn])
    assert own > other + 0.1, (own, other)
    assert inside > 1.5, inside  # the map's mass on the scars, relative to their share of the image
