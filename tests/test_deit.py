"""semples/deit.py, WeakTr's DeiT-S mask generator: parity with timm's DeiT-S (test oracle), the position-embedding
resize, the adaptive attention fusion and fine CAM against explicit loops, what trains in each mode, the ImageNet
file and the WeakTr checkpoint format."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semples.deit import (DEIT_S, DeiTS, deit_config_from_state_dict, load_imagenet_deit, load_weaktr_checkpoint,
                          save_weaktr_checkpoint)

TINY = dict(num_classes=2, img_size=12, patch_size=4, embed_dim=12, depth=2, num_heads=2, mlp_ratio=2.0,
            reduction=2, feat_reduction=2)  # 4 maps -> hidden 2; 6-channel groups -> hidden 3


def _perturb(model, scale=0.05, seed=0):
    """Move every parameter off its (often 0/1) initialisation, so swapped weights or biases show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _deit_file_dict(width=384, depth=12, mlp=1536, patch=16, grid=14, seed=0):
    """A state dict with the DeiT authors' file's keys and shapes (timm names), random values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {"cls_token": r(1, 1, width), "pos_embed": r(1, 1 + grid * grid, width),
          "patch_embed.proj.weight": r(width, 3, patch, patch), "patch_embed.proj.bias": r(width)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": r(width), b + "norm1.bias": r(width),
                   b + "attn.qkv.weight": r(3 * width, width), b + "attn.qkv.bias": r(3 * width),
                   b + "attn.proj.weight": r(width, width), b + "attn.proj.bias": r(width),
                   b + "norm2.weight": r(width), b + "norm2.bias": r(width),
                   b + "mlp.fc1.weight": r(mlp, width), b + "mlp.fc1.bias": r(mlp),
                   b + "mlp.fc2.weight": r(width, mlp), b + "mlp.fc2.bias": r(width)})
    sd.update({"norm.weight": r(width), "norm.bias": r(width), "head.weight": r(1000, width), "head.bias": r(1000)})
    return sd


# ----------------------------------------------------------------------------------------------
# Parity with timm's DeiT-S (oracle)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deit_s20():
    """One DeiT-S with K=20 (VOC), shared: every file below loads its whole backbone."""
    torch.manual_seed(0)
    return DeiTS(num_classes=20)


@pytest.fixture(scope="module")
def timm_deit(tmp_path_factory):
    """timm's deit_small_patch16_224 (random weights, perturbed, eval), its per-block tokens and attention maps
    for one 224 x 224 batch, and its state dict saved in the ImageNet file's format."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = _perturb(timm.create_model("deit_small_patch16_224", pretrained=False)).eval()
    path = str(tmp_path_factory.mktemp("deit") / "deit_small_patch16_224-cd65a155.pth")
    torch.save({"model": ref.state_dict()}, path)
    seen = {"attn": [], "tokens": []}
    hooks = [ref.blocks[0].register_forward_pre_hook(lambda m, a: seen["tokens"].append(a[0]))]
    for blk in ref.blocks:
        blk.attn.fused_attn = False  # materialise the softmax weights (the input of attn_drop)
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda m, a, o: seen["attn"].append(a[0])))
        hooks.append(blk.register_forward_hook(lambda m, a, o: seen["tokens"].append(o)))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        normed = ref.forward_features(x)
        for h in hooks:
            h.remove()
        for blk in ref.blocks:
            blk.attn.fused_attn = True  # timm's default path (scaled_dot_product_attention)
        normed_fused = ref.forward_features(x)
        for blk in ref.blocks:
            blk.attn.fused_attn = False
    ours = load_imagenet_deit(DeiTS(num_classes=1), path).eval()
    with torch.no_grad():
        out = ours.forward_features(x, keep_tokens=True)
    return dict(model=ref, path=path, x=x, normed=normed, normed_fused=normed_fused, ours=ours, ours_out=out, **seen)


def test_timm_parity_one_class_token(timm_deit):
    ref = timm_deit["model"]
    file_like = _deit_file_dict()
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == {k: tuple(v.shape) for k, v in file_like.items()}
    S, out = timm_deit["ours"], timm_deit["ours_out"]
    tok = [(a - b).abs().max().item() for a, b in zip(out["tokens"], timm_deit["tokens"])]
    att = [(a - b).abs().max().item() for a, b in zip(out["attn"], timm_deit["attn"])]
    assert len(tok) == 13 and len(att) == 12
    with torch.no_grad():
        final = (S.norm(out["tokens"][-1]) - timm_deit["normed"]).abs().max().item()
        fused = (S.norm(out["tokens"][-1]) - timm_deit["normed_fused"]).abs().max().item()
    print(f"\nK=1 vs timm, max abs diff: tokens per block {max(tok):.2e}, attention maps {max(att):.2e}, "
          f"final norm {final:.2e}, final norm vs timm's fused attention {fused:.2e} "
          f"(token scale {timm_deit['tokens'][-1].abs().max().item():.1f})")
    assert tok[0] == 0.0
    assert max(tok) < 1e-5 and max(att) < 1e-5 and final < 1e-5 and fused < 1e-4


def test_timm_parity_twenty_class_tokens(timm_deit, deit_s20):
    """K=20 copies of the class token: the input path is timm's; after that the K equal class keys act as one key
    whose logit is raised by log K, so the sequence equals timm's blocks run with +log K on the class column."""
    ref, K = timm_deit["model"], 20
    S = load_imagenet_deit(deit_s20, timm_deit["path"]).eval()
    with torch.no_grad():
        out = S.forward_features(timm_deit["x"], keep_tokens=True)
        x0 = timm_deit["tokens"][0]
        assert torch.equal(out["tokens"][0][:, K:], x0[:, 1:])  # patch embedding + positions: identical
        assert torch.equal(out["tokens"][0][:, :K], x0[:, :1].expand(-1, K, -1))  # every class token is timm's
        t, diffs, spread = x0, [], []
        for i, blk in enumerate(ref.blocks):
            h = blk.norm1(t)
            B, N, C = h.shape
            q, k, v = blk.attn.qkv(h).reshape(B, N, 3, 6, C // 6).permute(2, 0, 3, 1, 4)
            logits = (q @ k.transpose(-2, -1)) * blk.attn.scale
            logits[..., 0] += math.log(K)
            t = t + blk.attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C))
            t = t + blk.mlp(blk.norm2(t))
            ours = out["tokens"][i + 1]
            diffs.append(max((ours[:, :1] - t[:, :1]).abs().max().item(), (ours[:, K:] - t[:, 1:]).abs().max().item()))
            spread.append((ours[:, :K] - ours[:, :1]).abs().max().item())
        patch_k1 = timm_deit["ours_out"]["patch"]
    print(f"\nK=20 vs timm with +log K: max abs diff {max(diffs):.2e}; class tokens' spread {max(spread):.2e}; "
          f"patch tokens vs K=1 differ by {(out['patch'] - patch_k1).abs().max().item():.2f}")
    # 20 equal exponentials vs one raised by log 20: the same number in other float roundings (tokens reach ~28)
    assert max(diffs) < 5e-5 and max(spread) < 1e-5
    assert (out["patch"] - patch_k1).abs().max() > 1e-2  # K=20 is not K=1 beyond the input


# ----------------------------------------------------------------------------------------------
# Position embedding for other sizes
# ----------------------------------------------------------------------------------------------
def _bicubic_matrix(n_in, n_out, scale, A=-0.75):
    """Rows: output positions; columns: input positions. Cubic convolution (A = -0.75), half-pixel centres,
    source = (i + 0.5) / scale - 0.5, borders replicated: the scale_factor= sampling."""
    def near(x):
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x):
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

    M = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        x0 = math.floor(src)
        t = src - x0
        for offset, w in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
            M[i, min(max(x0 + offset, 0), n_in - 1)] += w
    return M


@pytest.mark.smoke  # fast; the timm parity tests (imports, two DeiT-S runs) are not
def test_position_resize_by_hand():
    K, g = 3, 14
    S = DeiTS(num_classes=K, embed_dim=12, depth=1, num_heads=2)  # DeiT-S geometry: 224 px, patch 16
    pos = S.pos_embed.detach().double().numpy()[0]
    with torch.no_grad():
        got = S.pos_embed_at(320, 240)[0].double().numpy()
    gh, gw = 320 // 16, 240 // 16
    assert got.shape == (K + gh * gw, 12)
    Mh, Mw = _bicubic_matrix(g, gh, (gh + 0.1) / g), _bicubic_matrix(g, gw, (gw + 0.1) / g)
    grid = pos[K:].reshape(g, g, 12)
    hand = np.einsum("ip,jq,pqc->ijc", Mh, Mw, grid).reshape(gh * gw, 12)
    assert np.array_equal(got[:K], pos[:K])
    assert np.abs(got[K:] - hand).max() < 1e-5
    by_size = F.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=(gh, gw), mode="bicubic",
                            align_corners=False)[0].permute(1, 2, 0).reshape(gh * gw, 12).numpy()
    assert np.abs(by_size - hand).max() > 1e-3  # size= is measurably another resize
    assert torch.equal(S.pos_embed_at(224, 224), S.pos_embed) and torch.equal(S.pos_embed_at(230, 230), S.pos_embed)
    with torch.no_grad():
        fine, coarse = S.eval().cams(torch.randn(1, 3, 320, 240))
    assert fine.shape == coarse.shape == (1, K, gh, gw)


# ----------------------------------------------------------------------------------------------
# Fusion and fine CAM by explicit loops
# ----------------------------------------------------------------------------------------------
@pytest.mark.smoke
@pytest.mark.parametrize("pool", ["max", "avg"])
def test_fusion_and_fine_cam_by_hand(pool):
    torch.manual_seed(0)
    S = _perturb(DeiTS(**TINY, pool=pool), scale=0.5).eval()
    K, D, L, Hd = 2, 12, 2, 2
    m, C = D // Hd, L * Hd
    x = torch.randn(2, 3, 12, 16)  # a 3 x 4 grid: a non-square grid catches row/column swaps
    gh, gw, P = 3, 4, 12
    with torch.no_grad():
        o = S.forward_all(x)
    A = [a.double() for a in o["attn"]]  # L x [B, Hd, N, N]
    Fe = [f.double() for f in o["feats"]]  # L x [B, N, D]
    aaf = S.adaptive_attention_fusion
    W1, b1 = aaf.attn_feat_ffn[0].weight.double(), aaf.attn_feat_ffn[0].bias.double()
    W2, b2 = aaf.attn_feat_ffn[1].weight.double(), aaf.attn_feat_ffn[1].bias.double()
    V1, V2 = aaf.attn_head_ffn[0].weight.double(), aaf.attn_head_ffn[2].weight.double()
    conv_w, conv_b = S.head.weight.double(), S.head.bias.double()
    for b in range(2):
        s = torch.zeros(C, dtype=torch.float64)
        for j in range(Hd):
            for l in range(L):
                group = [j + i * Hd for i in range(m)]  # interleaved channels
                pooled = torch.stack([Fe[l][b, :, ch].max() if pool == "max" else Fe[l][b, :, ch].mean()
                                      for ch in group])
                s[j * L + l] = (W2 @ (W1 @ pooled + b1) + b2)[0]
        w = torch.sigmoid(V2 @ torch.relu(V1 @ s))
        fused = sum(w[j * L + l] * A[l][b, j] for j in range(Hd) for l in range(L)) / C
        assert torch.allclose(o["fusion_weights"][b].double(), w, atol=1e-6)
        assert torch.allclose(o["fused"][b].double(), fused, atol=1e-6)
        patches = o["patch"][b].double()  # [P, D], row-major over the grid
        coarse = torch.zeros(K, gh, gw, dtype=torch.float64)
        for k in range(K):
            for r in range(gh):
                for c in range(gw):
                    acc = conv_b[k].clone()
                    for dr in (-1, 0, 1):
                        for dc in (-1, 0, 1):
                            if 0 <= r + dr < gh and 0 <= c + dc < gw:
                                acc += conv_w[k, :, dr + 1, dc + 1] @ patches[(r + dr) * gw + c + dc]
                    coarse[k, r, c] = acc
        cams = torch.zeros(K, gh, gw, dtype=torch.float64)
        fine = torch.zeros(K, gh, gw, dtype=torch.float64)
        for k in range(K):
            for r in range(gh):
                for c in range(gw):
                    cams[k, r, c] = fused[k, K + r * gw + c] * max(coarse[k, r, c].item(), 0.0)
        for k in range(K):
            for i in range(P):
                fine[k, i // gw, i % gw] = sum(fused[K + i, K + jj] * cams[k, jj // gw, jj % gw] for jj in range(P))
        checks = {"coarse": (o["coarse"][b], coarse), "coarse_logits": (o["coarse_logits"][b], coarse.mean((1, 2))),
                  "class_attn": (o["class_attn"][b], fused[:K, K:].reshape(K, gh, gw)),
                  "affinity": (o["affinity"][b], fused[K:, K:]), "cams": (o["cams"][b], cams),
                  "fine_cam": (o["fine_cam"][b], fine), "fine_logits": (o["fine_logits"][b], fine.mean((1, 2))),
                  "cls_logits": (o["cls_logits"][b], o["cls"][b].double().mean(-1))}
        for name, (got, want) in checks.items():
            assert torch.allclose(got.double(), want, atol=1e-6), name
    assert torch.allclose(o["attn"][0].sum(-1), torch.ones(2, Hd, K + P), atol=1e-6)
    with torch.no_grad():
        logits = S(x)
        fine_cam, coarse_cam = S.cams(x)
    assert all(torch.equal(a, o[n]) for a, n in zip(logits, ("cls_logits", "coarse_logits", "fine_logits")))
    assert torch.equal(fine_cam, o["fine_cam"]) and torch.equal(coarse_cam, F.relu(o["coarse"]))


# ----------------------------------------------------------------------------------------------
# What trains
# ----------------------------------------------------------------------------------------------
@pytest.mark.smoke
def test_head_mode_trains_only_head_and_fusion():
    torch.manual_seed(0)
    S = _perturb(DeiTS(**TINY)).set_trainable("head").train()
    assert not any(b.training for b in S.blocks) and S.head.training  # fixed features: drop-path off
    assert all(b.training for b in DeiTS(**TINY).set_trainable("head", backbone_drop_path=True).train().blocks)
    head = {n for n, _ in S.named_parameters() if n.startswith(("head.", "adaptive_attention_fusion."))}
    assert sum(p.numel() for n, p in S.named_parameters() if p.requires_grad) == \
        sum(p.numel() for p in S.head_parameters())
    before = {n: p.detach().clone() for n, p in S.named_parameters()}
    opt = torch.optim.AdamW(S.parameters(), lr=1e-2, weight_decay=0.03)  # every parameter, as the release
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    loss = sum(F.multilabel_soft_margin_loss(z, y) for z in S(torch.randn(2, 3, 12, 12)))
    loss.backward()
    for n, p in S.named_parameters():
        if n in head:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None or not p.grad.any(), n
    opt.step()
    changed = {n for n, p in S.named_parameters() if not torch.equal(p, before[n])}
    assert changed == head
    # fine CAM alone: reaches the head in 'head' mode (the release), only the fusion in 'all' mode (WeakTr)
    for part, expect in (("head", head), ("all", {n for n in head if n.startswith("adaptive")})):
        S = DeiTS(**TINY).set_trainable(part)
        S.zero_grad()
        S(torch.randn(2, 3, 12, 12))[2].sum().backward()
        assert {n for n, p in S.named_parameters() if p.grad is not None and p.grad.any()} == expect, part
    with pytest.raises(ValueError, match="'all' or 'head'"):
        S.set_trainable("backbone")


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
@pytest.mark.smoke
def test_imagenet_file_lands_unchanged(tmp_path, deit_s20):
    K, S = 20, deit_s20
    sd = _deit_file_dict()
    path = str(tmp_path / "deit_small_patch16_224-cd65a155.pth")
    torch.save({"model": sd}, path)
    kept = {n: p.detach().clone() for n, p in S.named_parameters() if n.startswith(("head.", "adaptive"))}
    load_imagenet_deit(S, path)
    got = S.state_dict()
    for k, v in sd.items():
        if k.startswith(("blocks.", "patch_embed.", "norm.")):
            assert torch.equal(got[k], v), k
    assert torch.equal(got["cls_token"], sd["cls_token"].expand(1, K, -1))
    assert torch.equal(got["pos_embed"][:, :K], sd["pos_embed"][:, :1].expand(1, K, -1))
    assert torch.equal(got["pos_embed"][:, K:], sd["pos_embed"][:, 1:])
    assert all(torch.equal(got[n], v) for n, v in kept.items())  # head.* of the file dropped, ours kept

    def refused(obj_or_bytes, match):
        bad = str(tmp_path / "bad.pth")
        if isinstance(obj_or_bytes, bytes):
            open(bad, "wb").write(obj_or_bytes)
        else:
            torch.save(obj_or_bytes, bad)
        with pytest.raises(ValueError, match=match) as e:
            load_imagenet_deit(S, bad)  # refused before anything lands
        assert bad in str(e.value)

    data = open(path, "rb").read()
    refused(data[: len(data) // 2], "not a readable torch file")
    refused({"model": {k: v for k, v in sd.items() if k != "blocks.11.mlp.fc2.weight"}}, "blocks.11.mlp.fc2.weight")
    refused({"model": _deit_file_dict(width=192, mlp=768)}, r"cls_token is \(1, 1, 192\), expected \(1, 1, 384\)")
    refused({"model": {**sd, "blocks.0.mlp.fc1.weight": torch.zeros(768, 384)}}, "blocks.0.mlp.fc1.weight")
    refused({"conv1.weight": torch.zeros(64, 3, 7, 7)}, "conv1.weight")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_imagenet_deit(S, str(tmp_path / "missing.pth"))


@pytest.mark.smoke
def test_weaktr_checkpoint_round_trip(tmp_path):
    # DeiT-S on VOC: WeakTr's key names, 21.75 M parameters, 70,965 in the head and fusion
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    keys += [f"blocks.{i}.{m}.{w}" for i in range(12) for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1",
                                                                   "mlp.fc2") for w in ("weight", "bias")]
    keys += ["norm.weight", "norm.bias", "head.weight", "head.bias",
             "adaptive_attention_fusion.attn_feat_ffn.0.weight", "adaptive_attention_fusion.attn_feat_ffn.0.bias",
             "adaptive_attention_fusion.attn_feat_ffn.1.weight", "adaptive_attention_fusion.attn_feat_ffn.1.bias",
             "adaptive_attention_fusion.attn_head_ffn.0.weight", "adaptive_attention_fusion.attn_head_ffn.2.weight"]
    with torch.device("meta"):  # shapes only
        voc = DeiTS(num_classes=20, **DEIT_S)
    sd = voc.state_dict()
    assert sorted(sd) == sorted(keys)
    assert sd["head.weight"].shape == (20, 384, 3, 3) and sd["pos_embed"].shape == (1, 216, 384)
    assert sd["adaptive_attention_fusion.attn_head_ffn.0.weight"].shape == (9, 72)
    assert sd["adaptive_attention_fusion.attn_feat_ffn.0.weight"].shape == (8, 64)
    assert sum(p.numel() for p in voc.parameters()) == 21_751_221
    assert sum(p.numel() for p in voc.head_parameters()) == 70_965
    with torch.device("meta"):
        rebuilt = DeiTS(**deit_config_from_state_dict(sd))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in sd.items()}

    torch.manual_seed(0)
    S = _perturb(DeiTS(**TINY)).eval()
    path = str(tmp_path / "checkpoint.pth")
    save_weaktr_checkpoint(S, path, epoch=59)
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"model", "epoch"} and obj["epoch"] == 59
    torch.manual_seed(1)
    T, _ = load_weaktr_checkpoint(path, DeiTS(**TINY))
    U, _ = load_weaktr_checkpoint(path)  # architecture read off the file
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        want = S.eval()(x)
        for M in (T, U):
            assert all(torch.equal(a, b) for a, b in zip(M.state_dict().values(), S.state_dict().values()))
            assert all(torch.equal(a, b) for a, b in zip(M.eval()(x), want))
    torch.save({"model": {"module." + k: v for k, v in S.state_dict().items()}, "epoch": 0}, path)  # a DDP save
    assert torch.equal(load_weaktr_checkpoint(path, DeiTS(**TINY))[0].head.weight, S.head.weight)

    for other, match in ((dict(num_classes=3), r"cls_token is \(1, 2, 12\)"),
                         (dict(reduction=1), "attn_head_ffn.0.weight")):
        torch.save({"model": S.state_dict()}, path)
        with pytest.raises(ValueError, match=match) as e:
            load_weaktr_checkpoint(path, DeiTS(**{**TINY, **other}))
        assert path in str(e.value)
    torch.save({"model": {k: v for k, v in S.state_dict().items() if not k.startswith("adaptive")}}, path)
    with pytest.raises(ValueError, match="adaptive_attention_fusion") as e:
        load_weaktr_checkpoint(path, DeiTS(**TINY))
    assert path in str(e.value)
