"""Tests of the clip/ package. Oracles: open_clip (model + tokenizer), torchvision, plain arithmetic."""
import copy
import hashlib
import pickle
import shutil

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

TEXTS = ["a photo of a cat.", "A DIAGRAM of the brain, with labels!"]


def _randomize_1d(model):
    """open_clip inits LN/BN to identity and bn3 to zero; randomise them so every weight matters in parity tests."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and t.ndim == 1:
                r = torch.rand(t.shape, generator=g)
                t.copy_(r + 0.5 if name.endswith(("weight", "running_var")) else 0.2 * (r - 0.5))


def _features(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def _tiny_vit():
    torch.manual_seed(0)
    return clip.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                     context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                     transformer_layers=2).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random ViT CLIP of ours and the path of its state dict."""
    model = _tiny_vit()
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return model, path


def _assert_same_features(ours, theirs, images, tokens, atol=1e-4):
    for a, b in zip(_features(ours, images, tokens), _features(theirs, images, tokens)):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < atol


# ---------------------------------------------------------------- parity with open_clip

@pytest.mark.smoke
def test_vit_b32_matches_open_clip(tmp_path):
    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
    _randomize_1d(ref)
    path = tmp_path / "vit_b32.pt"
    torch.save(ref.state_dict(), path)
    model, preprocess = clip.load(str(path), device="cpu")
    path.unlink()  # 600 MB; do not leave it in pytest's kept temp dirs
    assert model.dtype == torch.float32 and not model.training
    assert (model.visual.input_resolution, model.context_length, model.vocab_size) == (224, 77, 49408)
    images = torch.randn(2, 3, 224, 224)
    _assert_same_features(model, ref, images, clip.tokenize(TEXTS))


@pytest.mark.smoke
def test_small_modified_resnet_matches_open_clip(tmp_path):
    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=(1, 2, 1, 1), width=32, image_size=64, patch_size=None)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2)
    ref = open_clip.model.CLIP(64, vision, text, quick_gelu=True).eval()
    _randomize_1d(ref)
    # Our constructor, with OpenAI's argument list, must produce the same keys and shapes.
    ours = clip.CLIP(64, 64, (1, 2, 1, 1), 32, None, 77, 49408, 64, 1, 2)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}

    path = tmp_path / "rn.pt"
    torch.save(ref.state_dict(), path)
    model, _ = clip.load(str(path), device="cpu")
    images, tokens = torch.randn(2, 3, 64, 64), clip.tokenize(TEXTS)
    _assert_same_features(model, ref, images, tokens)
    with torch.no_grad():
        logits_per_image, logits_per_text = model(images, tokens)
        img, txt, scale = ref(images, tokens)
    assert torch.allclose(logits_per_image, scale * img @ txt.t(), atol=1e-4)
    assert torch.equal(logits_per_text, logits_per_image.t())


@pytest.mark.smoke
def test_patch_features(tmp_path):
    """encode_image_patches: 'tokens' = open_clip's ViT patch tokens (after ln_post) times the visual
    projection; 'value' (MaskCLIP) = the last block's own attention made to attend each token to itself
    only; the class token through `tokens` is encode_image; a ResNet CLIP and an unknown mode are refused."""
    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=2, width=64, image_size=32, patch_size=8)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2)
    ref = open_clip.model.CLIP(32, vision, text, quick_gelu=True).eval()
    _randomize_1d(ref)
    torch.save(ref.state_dict(), tmp_path / "vit.pt")
    model, _ = clip.load(str(tmp_path / "vit.pt"), device="cpu")
    images = torch.randn(2, 3, 32, 32)
    ref.visual.output_tokens = True
    v = model.visual
    with torch.no_grad():
        _, tokens = ref.visual(images)
        ours = model.encode_image_patches(images, "tokens")
        last = v.transformer.resblocks[-1]
        y = last.ln_1(v.tokens(images, last_block=False))
        self_only = torch.full((17, 17), float("-inf")).fill_diagonal_(0)
        attended = last.attn(y, y, y, need_weights=False, attn_mask=self_only)[0]
        value = model.encode_image_patches(images)
        cls = v.ln_post(v.tokens(images)[:, 0]) @ v.proj
    assert ours.shape == value.shape == (2, 16, 32)
    assert (ours - tokens @ ref.visual.proj).abs().max().item() < 1e-4
    assert (value - v.ln_post(attended[:, 1:]) @ v.proj).abs().max().item() < 1e-4
    assert torch.equal(cls, model.encode_image(images))
    with pytest.raises(ValueError, match="'value' or 'tokens'"):
        model.encode_image_patches(images, "keys")
    rn = clip.CLIP(64, 64, (1, 1, 1, 1), 32, None, 77, 49408, 64, 1, 1)
    with pytest.raises(ValueError, match="ViT"):
        rn.encode_image_patches(torch.randn(1, 3, 64, 64))


def test_patchify_gradients_are_the_convolutions(tiny, monkeypatch):
    """On CPU an image that needs a gradient (stages a and c) goes through clip.model._Patchify: the features
    and the gradients of the image and of conv1's weight are those of torch's own convolution (the oracle:
    the same model with _Patchify replaced by F.conv2d); an image without a gradient never takes it."""
    model = copy.deepcopy(tiny[0])
    weight = model.visual.conv1.weight.requires_grad_(True)
    x, w = torch.randn(5, 3, 32, 32, requires_grad=True), torch.randn(5, 32)
    calls, fast_apply = [], clip.model._Patchify.apply

    def run():
        out = model.encode_image(x)
        return out, torch.autograd.grad((out * w).sum(), [x, weight])
    monkeypatch.setattr(clip.model._Patchify, "apply", lambda *a: calls.append(1) or fast_apply(*a))
    fast, fast_grads = run()
    with torch.no_grad():
        model.encode_image(x.detach())
    assert len(calls) == 1
    monkeypatch.setattr(clip.model._Patchify, "apply", lambda x, w: F.conv2d(x, w, stride=w.shape[-1]))
    ref, ref_grads = run()
    assert torch.equal(fast, ref)
    for a, b in zip(fast_grads, ref_grads):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- tokenizer

HARD_STRINGS = [
    "", "   ", "Hello World!", "MiXeD CaSe TEXT", "Café naïve résumé Ångström Straße",
    "東京タワーの写真", "一只猫 and 犬", "a photo of a 🐶 dog 🎉👨‍👩‍👧",
    "Tom &amp; Jerry", "&lt;b&gt;bold&lt;/b&gt;", "&amp;lt;double escaped&amp;gt;",
    "<p>&amp;lt;tag in html&amp;gt;</p>",  # ftfy leaves HTML with '<' alone: the two html.unescape calls matter
    "mojibake: cafÃ©", "line one\nline two\t\ttab   spaces  \r\n",
    "Hello,   world!!!  ... what's up? I'll, we've, you're, she'd", "2024-01-01 3.14159 1,000,000",
    "don't stop believin'", "zero\u200bwidth", "ﬁne ligatures", "C++ & C# <-> x^2 @user #tag",
]


@pytest.mark.smoke
def test_tokenize_matches_open_clip():
    ref = open_clip.tokenizer.SimpleTokenizer()
    ours = clip.tokenize(HARD_STRINGS)
    assert ours.dtype == torch.long and ours.shape == (len(HARD_STRINGS), 77)
    assert torch.equal(ours, open_clip.tokenize(HARD_STRINGS))
    assert torch.equal(clip.tokenize("Hello World!", context_length=16), open_clip.tokenize("Hello World!", 16))
    from clip.simple_tokenizer import SimpleTokenizer
    tok = SimpleTokenizer()
    for s in HARD_STRINGS:
        ids = ref.encode(s)
        assert tok.encode(s) == ids, s
        assert tok.decode(ids) == ref.decode(ids), s


@pytest.mark.smoke
def test_tokenize_too_long():
    long_text = "a very long caption " * 30
    with pytest.raises(ValueError, match="too long for context length 77"):
        clip.tokenize(["short", long_text])
    truncated = clip.tokenize(["short", long_text], truncate=True)
    assert torch.equal(truncated, open_clip.tokenize(["short", long_text]))
    assert truncated[1, -1].item() == 49407  # EOT last, as OpenAI
    exactly_full = "cat " * 75  # 75 tokens + SOT + EOT = 77 fits
    assert clip.tokenize(exactly_full)[0, -1].item() == 49407


# ---------------------------------------------------------------- checkpoint formats

@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")  # torch.jit is deprecated
def test_torchscript_archive_loads(tiny, tmp_path):
    """OpenAI shipped CLIP as TorchScript archives; a traced model of ours stands in for one."""
    model, _ = tiny
    images, tokens = torch.randn(2, 3, 32, 32), clip.tokenize(TEXTS)
    with torch.no_grad():
        traced = torch.jit.trace(model, (images, tokens))
    path = tmp_path / "traced.pt"
    torch.jit.save(traced, str(path))
    loaded, _ = clip.load(str(path), device="cpu")
    for a, b in zip(_features(loaded, images, tokens), _features(model, images, tokens)):
        assert torch.equal(a, b)


def test_state_dict_with_meta(tiny, tmp_path):
    model, plain = tiny
    path = tmp_path / "meta.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 7, "config": {"embed_dim": 32}}, path)
    loaded, _ = clip.load(str(path), device="cpu")
    assert loaded.meta == {"epoch": 7, "config": {"embed_dim": 32}}
    assert clip.load(str(plain), device="cpu")[0].meta == {}
    images, tokens = torch.randn(1, 3, 32, 32), clip.tokenize(TEXTS)
    for a, b in zip(_features(loaded, images, tokens), _features(model, images, tokens)):
        assert torch.equal(a, b)


def test_toy_checkpoint_with_nonstandard_heads(tmp_path):
    """make_toy.py saves {"state_dict", "meta": {"config": CLIP kwargs}}; heads come from that config."""
    torch.manual_seed(0)
    config = dict(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                  context_length=24, vocab_size=49408, transformer_width=64, transformer_heads=4, transformer_layers=2)
    model = clip.CLIP(**config).eval()
    path = tmp_path / "toy.pt"
    torch.save({"state_dict": model.state_dict(), "meta": {"config": config, "seed": 0}}, path)
    loaded, _ = clip.load(str(path), device="cpu")
    assert loaded.meta == {"meta": {"config": config, "seed": 0}} and loaded.context_length == 24
    assert loaded.transformer.resblocks[0].attn.num_heads == 4
    images, tokens = torch.randn(1, 3, 32, 32), clip.tokenize(TEXTS, context_length=24)
    for a, b in zip(_features(loaded, images, tokens), _features(model, images, tokens)):
        assert torch.equal(a, b)


def test_preprocess(tiny):
    _, preprocess = clip.load(str(tiny[1]), device="cpu")  # n_px = visual.input_resolution = 32
    assert isinstance(clip.MEAN, tuple) and isinstance(clip.STD, tuple)
    x = preprocess(Image.new("L", (100, 50), 128))  # grayscale, non-square
    expected = (128 / 255 - torch.tensor(clip.MEAN)) / torch.tensor(clip.STD)
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x, expected[:, None, None].expand(3, 32, 32), atol=1e-5)
    pickle.dumps(preprocess)  # DataLoader workers may need to pickle it


# ---------------------------------------------------------------- prompt path

def test_prompt_path_reproduces_encode_text(tiny):
    model, _ = tiny
    tokens = clip.tokenize(TEXTS)
    with torch.no_grad():
        ref = model.encode_text(tokens)
        out = model.encode_token_embeddings(model.token_embedding(tokens), tokens.argmax(-1))
        assert torch.equal(out, ref)
        # The docstring recipe, with the "learned" vectors set to the embeddings of "a cat".
        t = clip.tokenize("a photo of .")[0]
        e = model.token_embedding(t)
        p = model.token_embedding(clip.tokenize("a cat")[0, 1:3])
        x = torch.cat([e[:4], p, e[4:-2]])[None]
        got = model.encode_token_embeddings(x, (t.argmax() + 2)[None])
        want = model.encode_text(clip.tokenize("a photo of a cat."))
        assert (got - want).abs().max().item() < 1e-6
    # Gradients reach a learnable prompt through the frozen model.
    p = torch.nn.Parameter(0.02 * torch.randn(4, e.shape[1]))
    x = torch.cat([e[:4].detach(), p, e[4:-4].detach()])[None]
    model.encode_token_embeddings(x, (t.argmax() + 4)[None]).sum().backward()
    assert p.grad is not None and p.grad.abs().sum() > 0


# ---------------------------------------------------------------- named models and bad input

def test_missing_path_and_unknown_name(tmp_path):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        clip.load(missing)
    with pytest.raises(FileNotFoundError, match="ViT-B/16"):  # the message lists the available models
        clip.load("ViT-H/99")
    assert "ViT-L/14@336px" in clip.available_models() and len(clip.available_models()) == 9
    with pytest.raises(NotImplementedError):
        clip.load("RN50", jit=True)


def test_not_a_clip_state_dict(tmp_path):
    import torchvision
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match=r"resnet18\.pt.*token_embedding\.weight"):
        clip.load(str(path))


def test_named_model_absent_and_download_fails(tmp_path, monkeypatch):
    def no_network(url, path, timeout=10):
        raise OSError("network unreachable")
    monkeypatch.setattr(clip.clip, "_download", no_network)
    monkeypatch.setenv("CLIP_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        clip.load("ViT-B/32")
    msg = str(err.value)
    assert str(tmp_path / "ViT-B-32.pt") in msg and clip.clip._MODELS["ViT-B/32"] in msg and "CLIP_CACHE_DIR" in msg


def test_named_model_corrupt_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIP_CACHE_DIR", str(tmp_path))
    (tmp_path / "RN50.pt").write_bytes(b"truncated download")
    with pytest.raises(RuntimeError, match="SHA256"):
        clip.load("RN50")


def test_named_model_download_and_cache(tiny, tmp_path, monkeypatch):
    model, src = tiny
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    monkeypatch.setitem(clip.clip._MODELS, "tiny", f"https://example.invalid/{sha}/tiny.pt")
    calls = []

    def fake_download(url, path, timeout=10):
        calls.append(url)
        shutil.copy(src, path)
    monkeypatch.setattr(clip.clip, "_download", fake_download)
    monkeypatch.setenv("CLIP_CACHE_DIR", str(tmp_path / "unused"))
    root = tmp_path / "cache"  # download_root wins over CLIP_CACHE_DIR
    for _ in range(2):  # second call must use the cached file
        loaded, _ = clip.load("tiny", device="cpu", download_root=str(root))
    assert len(calls) == 1 and (root / "tiny.pt").is_file() and not (tmp_path / "unused").exists()
    images, tokens = torch.randn(1, 3, 32, 32), clip.tokenize(TEXTS)
    for a, b in zip(_features(loaded, images, tokens), _features(model, images, tokens)):
        assert torch.equal(a, b)


def test_fp16_weights_close_to_fp32():
    """The half-precision layout load() uses on CUDA (here run on CPU): norms fp32, the rest fp16."""
    from clip.model import convert_weights
    model = _tiny_vit()
    images, tokens = torch.randn(2, 3, 32, 32), clip.tokenize(TEXTS)
    ref = _features(model, images, tokens)
    convert_weights(model)
    assert model.dtype == torch.float16 and model.ln_final.weight.dtype == torch.float32
    for a, b in zip(_features(model, images, tokens), ref):
        assert a.dtype == torch.float16
        np.testing.assert_allclose(a.float().numpy(), b.numpy(), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16(tiny):
    model, path = tiny
    loaded, _ = clip.load(str(path), device="cuda")
    assert loaded.dtype == torch.float16
    images, tokens = torch.randn(2, 3, 32, 32), clip.tokenize(TEXTS)
    for a, b in zip(_features(loaded, images.cuda(), tokens.cuda()), _features(model, images, tokens)):
        assert a.dtype == torch.float16
        np.testing.assert_allclose(a.float().cpu().numpy(), b.numpy(), atol=2e-2, rtol=2e-2)
