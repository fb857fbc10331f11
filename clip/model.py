"""CLIP model (ViT or modified-ResNet image tower + causal text transformer).

Module and parameter names follow OpenAI's release exactly, so official
checkpoints load with `load_state_dict` unchanged. Activations are [batch, tokens, width]
throughout (OpenAI used [tokens, batch, width]; the weights do not care).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32, so fp16 models (weights kept fp32 here) stay stable."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that the OpenAI checkpoints were trained with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential()  # a Sequential with named children gives the keys mlp.c_fc / mlp.c_proj
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x, attn_mask=None):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x, attn_mask=None):
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class _Patchify(torch.autograd.Function):
    """The ViT's conv1 (kernel = stride = patch) with the image's gradient computed as the matmul it amounts
    to, folded back (each pixel lies in exactly one patch). Forward and the weight's gradient are the
    convolution's own. Why: on CPU, mkldnn's input gradient for this convolution took 41 ms where the matmul
    takes 5 (84 images of 64 px), a third of the CLIP time of stages (a) and (c), whose loss flows through
    CLIP into the masks; the two gave the same bits (1 and 2 threads, this project's CPU)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, stride=weight.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        patch, (n, width, gh, gw) = weight.shape[-1], g.shape
        g = g.to(weight.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            cols = g.permute(0, 2, 3, 1).reshape(-1, width) @ weight.reshape(width, -1)  # [N*grid*grid, 3*p*p]
            grad_x = F.fold(cols.reshape(n, gh * gw, -1).transpose(1, 2), x.shape[-2:], patch, stride=patch)
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = torch.nn.grad.conv2d_weight(x.to(weight.dtype), weight.shape, g, stride=patch)
        return grad_x, grad_w


class VisionTransformer(nn.Module):
    """ViT: patchify, prepend a class token, transformer, project the class token."""

    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.input_resolution = input_resolution
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def tokens(self, x, last_block=True):
        """The transformer's tokens [N, 1 + grid*grid, width], class token first; without `last_block`,
        those that enter the last block."""
        w = self.conv1.weight  # on CPU, an image that needs a gradient takes the fast path (_Patchify)
        x = _Patchify.apply(x, w) if x.device.type == "cpu" and x.requires_grad else self.conv1(x)
        x = x.flatten(2).transpose(1, 2)  # [N, grid*grid, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))
        for block in self.transformer.resblocks[:None if last_block else -1]:
            x = block(x)
        return x

    def forward(self, x):
        return self.ln_post(self.tokens(x)[:, 0]) @ self.proj

    def patch_features(self, x, dense="value"):
        """One feature per patch in the joint image-text space, [N, grid*grid, output_dim], row-major over
        the patch grid. CLIP never trained these to match text; two ways to read them:
          'value' (MaskCLIP, Zhou et al. ECCV 2022): the last block's value path alone (ln_1, v, out_proj;
              no attention mixing, residual or MLP), then ln_post and proj. Each patch keeps its own content.
          'tokens': the last block's patch tokens through ln_post and proj, as the class token goes. The
              last attention mixes global content into every patch: on the toy CLIP these maps put the
              class text *off* the object (its mass there below the object's area), the value path 3x on it.
        """
        if dense == "tokens":
            return self.ln_post(self.tokens(x)[:, 1:]) @ self.proj
        if dense != "value":
            raise ValueError(f"dense must be 'value' or 'tokens', got {dense!r}")
        last = self.transformer.resblocks[-1]
        y = last.ln_1(self.tokens(x, last_block=False)[:, 1:])
        width = y.shape[-1]  # in_proj stacks the q, k, v weights: v is the last third
        v = F.linear(y, last.attn.in_proj_weight[2 * width:], last.attn.in_proj_bias[2 * width:])
        return self.ln_post(last.attn.out_proj(v)) @ self.proj


class Bottleneck(nn.Module):
    """ResNet bottleneck whose strided version anti-aliases with an avgpool instead of a strided conv."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        out = planes * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3, self.bn3 = nn.Conv2d(planes, out, 1, bias=False), nn.BatchNorm2d(out)
        self.downsample = None
        if stride > 1 or inplanes != out:
            # Keys downsample.0 (conv) / downsample.1 (bn); the parameter-free pool is applied in forward.
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(self.avgpool(y)))
        identity = x if self.downsample is None else self.downsample(self.avgpool(x))
        return F.relu(y + identity)


class AttentionPool2d(nn.Module):
    """Pool a feature map with one attention query: the mean of all positions."""

    def __init__(self, spatial_dim, embed_dim, heads, output_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj, self.q_proj, self.v_proj = (nn.Linear(embed_dim, embed_dim) for _ in range(3))
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.heads = heads

    def forward(self, x):
        x = x.flatten(2).transpose(1, 2)  # [N, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        n, t, c = x.shape
        split = lambda z: z.view(n, z.shape[1], self.heads, c // self.heads).transpose(1, 2)  # [N, heads, T, c/heads]
        q, k, v = split(self.q_proj(x[:, :1])), split(self.k_proj(x)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, 1, c/heads]
        return self.c_proj(out.transpose(1, 2).reshape(n, c))


class ModifiedResNet(nn.Module):
    """ResNet with a 3-conv stem, avgpool downsampling and attention pooling (CLIP's RN50 etc.)."""

    def __init__(self, layers, output_dim, heads, input_resolution=224, width=64):
        super().__init__()
        self.input_resolution = input_resolution
        w = width // 2
        self.conv1, self.bn1 = nn.Conv2d(3, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w)
        self.conv2, self.bn2 = nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.conv3, self.bn3 = nn.Conv2d(w, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        inplanes = width
        for i, blocks in enumerate(layers):
            planes, stride = width * 2 ** i, (1 if i == 0 else 2)
            stage = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def forward(self, x):
        for conv, bn in [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]:
            x = F.relu(bn(conv(x)))
        x = F.avg_pool2d(x, 2)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


class CLIP(nn.Module):
    """Contrastive image-text model; `vision_layers` int => ViT, tuple of 4 => modified ResNet."""

    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                 context_length, vocab_size, transformer_width, transformer_heads, transformer_layers):
        super().__init__()
        self.context_length, self.vocab_size = context_length, vocab_size
        if isinstance(vision_layers, (tuple, list)):
            self.visual = ModifiedResNet(vision_layers, embed_dim, heads=vision_width * 32 // 64,
                                         input_resolution=image_resolution, width=vision_width)
        else:  # OpenAI uses 64-dim heads; max(1, .) only matters for toy widths below 64
            self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                            max(1, vision_width // 64), embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.initialize_parameters()

    def initialize_parameters(self):
        """OpenAI's init: small embeddings, depth-scaled residual projections, zero-init last BN of each block."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.constant_(self.logit_scale, math.log(1 / 0.07))
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(lin.weight, std=pool.c_proj.in_features ** -0.5)
            for name, p in self.visual.named_parameters():
                if name.startswith("layer") and name.endswith("bn3.weight"):
                    nn.init.zeros_(p)  # each residual block starts as the identity
        # OpenAI initialised only the text transformer this way; the same scaling suits the ViT blocks too.
        for tf in (self.transformer, getattr(self.visual, "transformer", None)):
            if tf is None:
                continue
            proj_std = tf.width ** -0.5 * (2 * tf.layers) ** -0.5
            for block in tf.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=tf.width ** -0.5)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=(2 * tf.width) ** -0.5)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    def encode_image(self, image):
        return self.visual(image.type(self.dtype))

    def encode_image_patches(self, image, dense="value"):
        """Per-patch image features [N, grid*grid, embed_dim] (not normalised; VisionTransformer.patch_features
        says what `dense` picks); ViT CLIPs only."""
        if not isinstance(self.visual, VisionTransformer):
            raise ValueError("per-patch features need a ViT CLIP (e.g. ViT-B/32); this one is a modified ResNet")
        return self.visual.patch_features(image.type(self.dtype), dense)

    def encode_token_embeddings(self, x, eot_index):
        """Text features from token embeddings; the entry point for learned (CoOp-style) prompts.

        x: [N, L, transformer_width] token embeddings (from `token_embedding`, WITHOUT positional
        embedding), L <= context_length (normally L == context_length). eot_index: LongTensor [N],
        the position of each sequence's EOT token, whose final feature is projected. Returns
        [N, embed_dim] (not normalised). `encode_text(t)` is exactly
        `encode_token_embeddings(token_embedding(t), t.argmax(-1))`. Example, p = 4 learned vectors:

            t = clip.tokenize("a photo of .")[0]                  # [SOT] a photo of . [EOT] 0 ...
            e = model.token_embedding(t)                          # [77, width]
            p = nn.Parameter(0.02 * torch.randn(4, e.shape[1]))   # the learnable prompt
            x = torch.cat([e[:4], p, e[4:-4]])[None]              # [SOT] a photo of p1..p4 . [EOT] 0 ...
            f = model.encode_token_embeddings(x, (t.argmax() + 4)[None])
        """
        length = x.shape[1]
        x = x.type(self.dtype) + self.positional_embedding[:length].type(self.dtype)
        # Causal mask built on the fly (not a buffer) so it follows x's device/dtype and stays out of state_dict.
        mask = torch.full((length, length), float("-inf"), dtype=x.dtype, device=x.device).triu_(1)
        x = self.ln_final(self.transformer(x, mask))
        return x[torch.arange(x.shape[0], device=x.device), eot_index] @ self.text_projection

    def encode_text(self, text):
        # EOT has the largest id in the vocabulary, so argmax finds it.
        return self.encode_token_embeddings(self.token_embedding(text), text.argmax(dim=-1))

    def forward(self, image, text):
        """Returns (logits_per_image [N_img, N_txt], logits_per_text [N_txt, N_img])."""
        img = F.normalize(self.encode_image(image), dim=-1)
        txt = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * img @ txt.t()
        return logits_per_image, logits_per_image.t()


def convert_weights(model):
    """Cast conv/linear/attention weights and projections to fp16 as OpenAI's release does (norms stay fp32)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            m.weight.data = m.weight.data.half()
            if m.bias is not None:
                m.bias.data = m.bias.data.half()
        if isinstance(m, nn.MultiheadAttention):
            for p in (m.in_proj_weight, m.in_proj_bias):
                p.data = p.data.half()
        for name in ("text_projection", "proj"):
            p = getattr(m, name, None)
            if isinstance(p, nn.Parameter):
                p.data = p.data.half()
    return model


_TEXT_KEYS = ("token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight", "logit_scale",
              "transformer.resblocks.0.attn.in_proj_weight")
_VIT_KEYS = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj")
_RESNET_KEYS = ("visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding")


def build_model(state_dict, transformer_heads=None):
    """Build an fp32 CLIP (eval mode) from an OpenAI-format state dict, inferring every size from shapes.

    Text heads cannot be read from shapes; OpenAI always used width // 64, which is the default.
    Raises ValueError naming the expected keys when `state_dict` is not a CLIP state dict.
    """
    sd = {k: v for k, v in state_dict.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    vit = "visual.proj" in sd
    missing = [k for k in _TEXT_KEYS + (_VIT_KEYS if vit else _RESNET_KEYS) if k not in sd]
    if missing:
        raise ValueError(f"not a CLIP state dict: missing {missing}; expected OpenAI CLIP keys "
                         f"{list(_TEXT_KEYS)} plus {list(_VIT_KEYS)} (ViT) or {list(_RESNET_KEYS)} (ResNet)")
    count = lambda prefix: len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
    if vit:
        width, _, patch, _ = sd["visual.conv1.weight"].shape
        layers = count("visual.transformer.resblocks.")
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        resolution = patch * grid
    else:
        patch, width = None, sd["visual.layer1.0.conv1.weight"].shape[0]
        layers = tuple(count(f"visual.layer{i}.") for i in range(1, 5))
        resolution = 32 * round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = sd["ln_final.weight"].shape[0]
    model = CLIP(embed_dim=sd["text_projection"].shape[1], image_resolution=resolution, vision_layers=layers,
                 vision_width=width, vision_patch_size=patch, context_length=sd["positional_embedding"].shape[0],
                 vocab_size=sd["token_embedding.weight"].shape[0], transformer_width=text_width,
                 transformer_heads=transformer_heads or max(1, text_width // 64),
                 transformer_layers=count("transformer.resblocks."))
    _check_shapes(model, sd)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:  # an edited or foreign file: say which keys, not a 40-line RuntimeError
        raise ValueError(f"not the CLIP its shapes describe: missing keys {missing[:3]}"
                         f"{'...' if len(missing) > 3 else ''}, unexpected keys {unexpected[:3]}"
                         f"{'...' if len(unexpected) > 3 else ''}")
    return model.eval()


def _check_shapes(model, sd):
    """Raise ValueError naming the first weight whose shape differs from the one the file's other shapes imply."""
    own = model.state_dict()
    for name, t in sd.items():
        if name in own and tuple(own[name].shape) != tuple(t.shape):
            raise ValueError(f"weight '{name}' has shape {tuple(t.shape)}, but the file's other weights make a CLIP "
                             f"that needs {tuple(own[name].shape)}")
