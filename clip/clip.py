"""Public API: available_models(), load(), tokenize(), and the preprocessing constants."""
import hashlib
import os
import pickle
import shutil
import urllib.request
import warnings
import zipfile

import torch
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from .model import build_model, convert_weights
from .simple_tokenizer import SimpleTokenizer

# Per-channel RGB statistics of OpenAI's training images; every CLIP checkpoint expects them.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

# The second-to-last path component of each URL is the SHA256 of the file.
_MODELS = {
    "RN50": "https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": "https://openaipublic.azureedge.net/clip/models/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": "https://openaipublic.azureedge.net/clip/models/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": "https://openaipublic.azureedge.net/clip/models/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": "https://openaipublic.azureedge.net/clip/models/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
_tokenizer = SimpleTokenizer()


def available_models():
    """Names accepted by `load` (besides file paths)."""
    return list(_MODELS)


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _download(url, path, timeout=10):
    """Fetch `url` to `path` via a temporary file, so an interrupted download never looks complete."""
    tmp = path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _model_file(name, download_root=None):
    """Path of a named model's checkpoint in the cache folder; downloaded if absent, SHA256-checked."""
    url = _MODELS[name]
    root = download_root or os.environ.get("CLIP_CACHE_DIR") or os.path.expanduser("~/.cache/clip")
    path = os.path.join(root, os.path.basename(url))
    expected = url.split("/")[-2]
    if not os.path.isfile(path):
        try:
            os.makedirs(root, exist_ok=True)
            _download(url, path)
        except Exception as e:  # no network, proxy, disk...: tell the user how to provide the file by hand
            raise FileNotFoundError(
                f"CLIP weights {name!r} not found at {path} and downloading {url} failed ({e}). "
                f"Place the file at that path, or set CLIP_CACHE_DIR to a folder holding "
                f"{os.path.basename(url)}.") from None
    actual = _sha256(path)
    if actual != expected:
        raise RuntimeError(f"{path} has SHA256 {actual} but {expected} was expected (see {url}); "
                           f"the file is corrupt or incomplete: delete it and download it again.")
    return path


def _is_torchscript(path):
    # TorchScript zips hold a constants.pkl; files written by torch.save do not (torch tests the same).
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


def _read_checkpoint(path):
    """Returns (state_dict, meta) from a TorchScript archive, a state dict, or {"state_dict": sd, **meta}."""
    if _is_torchscript(path):  # OpenAI's released files; we only take their weights
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, but needed to read them
            return torch.jit.load(path, map_location="cpu").state_dict(), {}
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # metadata with arbitrary objects (e.g. an argparse Namespace): trusted file
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a text file, a truncated download, ...: say which file, not torch's internals
        reason = f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0].split(". ")[0][:150]
        raise ValueError(f"{path} is not a readable CLIP checkpoint ({reason}); it may be truncated or not a "
                         "torch file: pass a CLIP model name or a complete checkpoint") from None
    meta = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict or {{'state_dict': ...}}, got {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel/DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj, meta


def _saved_heads(meta):
    """Text heads from a saved constructor config (top level, "config", or "meta"/"config"), else None."""
    inner = meta.get("meta") if isinstance(meta.get("meta"), dict) else {}
    for d in (meta, meta.get("config"), inner, inner.get("config")):
        if isinstance(d, dict) and "transformer_heads" in d:
            return int(d["transformer_heads"])
    return None


def _to_rgb(image):
    return image.convert("RGB")


def _transform(n_px):
    return Compose([Resize(n_px, interpolation=InterpolationMode.BICUBIC), CenterCrop(n_px), _to_rgb,
                    ToTensor(), Normalize(MEAN, STD)])


def load(name_or_path, device=None, jit=False, download_root=None):
    """Load a CLIP model and its image preprocessing.

    name_or_path: a name from `available_models()` (looked up in `download_root`, else $CLIP_CACHE_DIR,
        else ~/.cache/clip; downloaded if absent), or a path to an OpenAI TorchScript archive, a
        state dict saved with torch.save, or a dict {"state_dict": sd, **meta} (meta becomes `model.meta`,
        {} otherwise; a "transformer_heads" entry in meta, meta["config"] or meta["meta"]["config"] sets
        the text heads, which shapes cannot tell; else width // 64 as in all OpenAI models).
    device: defaults to "cuda" if available. On CUDA the weights are fp16 as in OpenAI's release, else fp32.
    jit: only False is supported; we always build the eager model (TorchScript files are still accepted).
    Returns (model in eval mode, preprocess: PIL image -> normalised [3, n_px, n_px] tensor).
    """
    if jit:
        raise NotImplementedError("clip.load(jit=True) is not supported: this implementation always builds the "
                                  "eager nn.Module (TorchScript archives are read for their weights).")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if name_or_path in _MODELS:
        path = _model_file(name_or_path, download_root)
    elif os.path.isfile(name_or_path):
        path = name_or_path
    else:
        raise FileNotFoundError(f"{name_or_path!r} is neither an existing checkpoint file nor a known model name; "
                                f"available models: {available_models()}")
    state_dict, meta = _read_checkpoint(path)
    try:
        model = build_model(state_dict, transformer_heads=_saved_heads(meta))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    model.meta = meta
    model.to(device)
    if device.type == "cuda":
        convert_weights(model)
    return model.eval(), _transform(model.visual.input_resolution)


def tokenize(texts, context_length=77, truncate=False):
    """Tokenize a string or list of strings into a LongTensor [N, context_length].

    Each row is SOT, the BPE tokens, EOT, then zero padding. Too-long texts raise ValueError,
    unless truncate=True, which cuts them to context_length and puts EOT last.
    """
    if isinstance(texts, str):
        texts = [texts]
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [_tokenizer.sot_token] + _tokenizer.encode(text) + [_tokenizer.eot_token]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(f"Input {text!r} is too long for context length {context_length} "
                                 f"({len(ids)} tokens incl. SOT/EOT); pass truncate=True to cut it.")
            ids = ids[:context_length - 1] + [_tokenizer.eot_token]
        result[i, :len(ids)] = torch.tensor(ids)
    return result
