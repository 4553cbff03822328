"""The Region Perceiver: learned region queries that read the ViT grid and produce region tokens and masks.

Parameter names follow the released `region_perceiver/0079280.pt`, so its state dict loads unchanged.
No request state is kept on the module (only the position encodings of its fixed sizes): `decode` takes the raw
grid explicitly, which makes the module safe to share between concurrent requests (the official code keeps the
last grid on the module).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from medsight.config import PerceiverConfig

# The official masked attention *replaces* blocked scores by this value (not -inf), so a query whose keys
# are all blocked attends uniformly to every pixel.
MASK_FILL = -1e9


def sine_position_encoding(height: int, width: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """DETR-style normalised sine encoding (1, h, w, dim), computed in float32 as the official code does.

    The first dim/2 channels encode the row, the rest the column; sine and cosine are interleaved.
    """
    half = dim // 2
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device).view(1, height, 1).expand(1, height, width)
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device).view(1, 1, width).expand(1, height, width)
    eps, scale = 1e-6, 2 * math.pi
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    exponent = 2 * torch.div(torch.arange(half, dtype=torch.float32, device=device), 2, rounding_mode="floor") / half
    # The power is taken in float64 and rounded once: torch's vectorised float32 pow differs by one ulp
    # between CPU instruction sets, while this matches the official (scalar) result on every machine.
    dim_t = torch.pow(torch.tensor(10000.0, dtype=torch.float64, device=device), exponent.double()).float()
    pos_x = x[..., None] / dim_t
    pos_y = y[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3)


#: Attention kernels of the perceiver: "eager" is the official arithmetic (fill blocked scores with MASK_FILL,
#: subtract the row maximum, softmax); "sdpa" is torch's fused `scaled_dot_product_attention` with the same
#: semantics (a fully blocked row still attends uniformly), equal to eager within float rounding.
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
    """(B, H, N, dh) attention with `blocked` (B, N, M) True = masked, as the official fill-and-softmax does it."""
    if blocked is None:
        return F.scaled_dot_product_attention(q, k, v)
    full = blocked.all(dim=-1)  # (B, N): every score filled with the same constant -> uniform weights
    allowed = ~blocked | full[..., None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
    if bool(full.any()):
        out = torch.where(full[:, None, :, None], v.mean(dim=-2, keepdim=True), out)
    return out


class CrossAttention(nn.Module):
    """Pre-normed multi-head cross-attention without biases; `blocked` entries are replaced by MASK_FILL."""

    implementation: str = "eager"

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, kv: torch.Tensor, q: torch.Tensor, blocked: torch.Tensor | None = None) -> torch.Tensor:
        """kv: (B, M, d) keys/values source; q: (B, N, d) queries; blocked: (B, N, M) bool, True = masked."""
        b, n, _ = q.shape
        kv = self.norm_media(kv)
        q = self.norm_latents(q)
        k, v = self.to_kv(kv).chunk(2, dim=-1)
        q = self.to_q(q)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        if self.implementation == "sdpa":
            return self.to_out(sdpa_attention(q, k, v, blocked).transpose(1, 2).reshape(b, n, -1))
        sim = (q * self.dim_head**-0.5) @ k.transpose(-1, -2)  # (B, H, N, M)
        if blocked is not None:
            # float16 cannot hold MASK_FILL; its lowest value masks the same (exp underflows to 0 either way).
            sim = sim.masked_fill(blocked[:, None], max(MASK_FILL, torch.finfo(sim.dtype).min))
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        out = sim.softmax(dim=-1) @ v
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Linear, no biases (indices 0..3 are the checkpoint's names)."""
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )


class ConvAdapter(nn.Module):
    """x2 bilinear upsampling then a 3x3 convolution, on NHWC features."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.conv(x).permute(0, 2, 3, 1)


class SegmentationHead(nn.Module):
    """Mask logits <proj(q), pixel> and class logits from the raw query."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.class_embed = nn.Linear(dim, num_classes + 1)

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B, N, d), features (B, h, w, d) -> mask logits (B, N, h, w), class logits (B, N, C+1)."""
        masks = torch.einsum("bnd,bhwd->bnhw", self.proj(queries), features)
        return masks, self.class_embed(queries)


def next_stage_blocked(mask_logits: torch.Tensor) -> torch.Tensor:
    """(B, N, h, w) logits -> (B, N, 4hw) blocked pixels at twice the resolution (sigmoid < 0.5)."""
    up = F.interpolate(mask_logits, scale_factor=2, mode="bilinear", align_corners=False)
    return (up.sigmoid() < 0.5).flatten(2)


class BiDirectionalBlock(nn.Module):
    """Masked region->image attention, then image->region attention, each followed by an FF (sandwich norms)."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int) -> None:
        super().__init__()
        self.region_to_image = CrossAttention(dim, heads, dim_head)
        self.region_to_image_norm = nn.LayerNorm(dim)
        self.ff_region = feed_forward(dim, ff_mult)
        self.ff_region_norm = nn.LayerNorm(dim)
        self.image_to_region = CrossAttention(dim, heads, dim_head)
        self.image_to_region_norm = nn.LayerNorm(dim)
        self.ff_image = feed_forward(dim, ff_mult)
        self.ff_image_norm = nn.LayerNorm(dim)

    def forward(
        self,
        queries: torch.Tensor,
        features: torch.Tensor,
        blocked: torch.Tensor,
        query_padding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B, N, d); features (B, h, w, d); blocked (B, N, hw); query_padding (B, N) True = padding."""
        b, h, w, d = features.shape
        flat = features.reshape(b, h * w, d)
        queries = self.region_path(queries, features, blocked)
        # Pixels attend to the regions; padded query slots must not be seen.
        pad = None if query_padding is None else query_padding[:, None, :].expand(b, h * w, -1)
        flat = self.image_to_region_norm(self.image_to_region(queries, flat, pad) + flat)
        flat = self.ff_image_norm(self.ff_image(flat) + flat)
        return queries, flat.reshape(b, h, w, d)

    def region_path(self, queries: torch.Tensor, features: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        """The block's new queries: masked region->image attention and the region FF (the image path not run)."""
        b, h, w, d = features.shape
        queries = self.region_to_image_norm(self.region_to_image(features.reshape(b, h * w, d), queries, blocked)
                                            + queries)
        return self.ff_region_norm(self.ff_region(queries) + queries)


@dataclass
class GridFeatures:
    """The start of a perceiver run that does not depend on the queries, computed once per grid and shared by the
    encode pass (learned queries) and the decode pass (region codes) on that grid: the same tensors either way,
    so sharing them changes no output bit.

    Attributes:
        features: (B, h, w, d) the grid plus its sine position encoding (read by the initial cross-attention and
            the initial head).
        upsampled: (B, 2h, 2w, d) stage 0's conv adapter on `features` plus the position encoding (read by stage
            0's block); the queries only start to change the image features inside that block.
    """

    features: torch.Tensor
    upsampled: torch.Tensor

    def __getitem__(self, rows) -> GridFeatures:
        return GridFeatures(self.features[rows], self.upsampled[rows])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.features, self.upsampled))

    @staticmethod
    def cat(parts: list[GridFeatures]) -> GridFeatures:
        return GridFeatures(torch.cat([p.features for p in parts]), torch.cat([p.upsampled for p in parts]))


@dataclass
class PerceiverOutput:
    """Everything one perceiver run produces.

    `head_mask_logits`/`head_class_logits` hold the shared head's calls: init, one per stage, and the final.
    `blocked_masks[s]` is the attention mask consumed by stage s.
    """

    queries: torch.Tensor
    multi_scale_features: list[torch.Tensor]
    seg_logits: torch.Tensor
    class_logits: torch.Tensor
    head_mask_logits: list[torch.Tensor] = field(default_factory=list)
    head_class_logits: list[torch.Tensor] = field(default_factory=list)
    blocked_masks: list[torch.Tensor] = field(default_factory=list)


class RegionPerceiver(nn.Module):
    """Region queries refined over a x2 upsampling pyramid of the ViT grid (24 -> 192 for the full model)."""

    def __init__(self, cfg: PerceiverConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.region_queries = nn.Parameter(torch.empty(1, cfg.num_queries, d))
        # Saved in the released checkpoint but never used by the official forward.
        self.region_position_embed = nn.Embedding(cfg.num_queries, d)
        self.init_cross_attn = CrossAttention(d, cfg.heads, cfg.dim_head)
        self.init_cross_norm = nn.LayerNorm(d)
        self.init_ff = feed_forward(d, cfg.ff_mult)
        self.init_ff_norm = nn.LayerNorm(d)
        self.conv_adapters = nn.ModuleList(ConvAdapter(d) for _ in range(cfg.num_stages))
        self.bi_blocks = nn.ModuleList(
            BiDirectionalBlock(d, cfg.heads, cfg.dim_head, cfg.ff_mult) for _ in range(cfg.num_stages)
        )
        self.segmentation_cls_head = SegmentationHead(d, cfg.num_classes)
        # (height, width, device) -> sine encoding; see `position_encoding`.
        self.position_encodings: dict[tuple[int, int, str], torch.Tensor] = {}
        self.reset_parameters()

    def position_encoding(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """`sine_position_encoding`, computed once per (size, device) and kept by this module: the same values,
        not recomputed on every call (the pyramid sizes are fixed by the config; the ONNX export bakes these
        tensors into its graphs). The cached tensor is shared: callers must not modify it in place."""
        key = (int(height), int(width), str(device))
        if key not in self.position_encodings:
            with torch.inference_mode(False), torch.no_grad():
                self.position_encodings[key] = sine_position_encoding(height, width, self.cfg.dim, device)
        return self.position_encodings[key]

    def reset_parameters(self) -> None:
        """The official initialisation: Xavier for queries and linears, Kaiming for convs."""
        nn.init.xavier_uniform_(self.region_queries)
        nn.init.xavier_uniform_(self.region_position_embed.weight)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def grid_features(self, grid: torch.Tensor) -> GridFeatures:
        """The query-independent start of a run on the raw (B, h, w, d) grid (see `GridFeatures`)."""
        h, w = grid.shape[1:3]
        features = grid + self.position_encoding(h, w, grid.device).to(grid.dtype)
        upsampled = self.conv_adapters[0](features)
        sh, sw = upsampled.shape[1:3]
        return GridFeatures(features, upsampled + self.position_encoding(sh, sw, grid.device).to(grid.dtype))

    def forward(
        self,
        grid: torch.Tensor,
        queries: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        grid_features: GridFeatures | None = None,
    ) -> PerceiverOutput:
        """Run the perceiver on a raw ViT grid.

        Args:
            grid: (B, h, w, d) raw ViT patch features (no position encoding).
            queries: optional (B, K, d) initial queries replacing the learned ones (region codes).
            query_mask: optional (B, K) bool, True for real queries, False for padding. Padding never
                changes the result of the real queries.
            grid_features: `grid_features(grid)` when already computed for this grid (saves the stage-0 conv).
        """
        return self._run(grid, queries, query_mask, grid_features, region_tokens_only=False)

    def region_tokens(self, grid: torch.Tensor, grid_features: GridFeatures | None = None) -> torch.Tensor:
        """The final learned queries (B, Q, d) of `forward(grid).queries`, bit for bit, at about half the cost:
        the last stage's image path (image->region attention and image FF) and the final mask head only feed the
        masks, so they are skipped."""
        return self._run(grid, None, None, grid_features, region_tokens_only=True).queries

    def _run(self, grid, queries, query_mask, grid_features, region_tokens_only: bool) -> PerceiverOutput:
        b, h, w, d = grid.shape
        if queries is None:
            queries = self.region_queries.expand(b, -1, -1)
        elif queries.ndim != 3 or queries.shape[0] != b or queries.shape[2] != d:
            raise ValueError(f"queries must be (B={b}, K, {d}), got {tuple(queries.shape)}")
        queries = queries.to(grid.dtype)
        padding = None if query_mask is None else ~query_mask.to(torch.bool)
        if grid_features is None:
            grid_features = self.grid_features(grid)
        elif tuple(grid_features.features.shape) != (b, h, w, d):
            raise ValueError(f"grid_features are for shape {tuple(grid_features.features.shape)}, not the grid's "
                             f"{(b, h, w, d)}")

        features = grid_features.features
        queries = self.init_cross_norm(self.init_cross_attn(features.reshape(b, h * w, d), queries) + queries)
        queries = self.init_ff_norm(self.init_ff(queries) + queries)
        mask_logits, class_logits = self.segmentation_cls_head(queries, features)
        out = PerceiverOutput(queries, [features], mask_logits, class_logits, [mask_logits], [class_logits])
        last = len(self.bi_blocks) - 1
        for stage, (adapter, block) in enumerate(zip(self.conv_adapters, self.bi_blocks, strict=True)):
            blocked = next_stage_blocked(mask_logits)
            out.blocked_masks.append(blocked)
            if stage == 0:
                upsampled = grid_features.upsampled
            else:
                upsampled = adapter(features)
                sh, sw = upsampled.shape[1:3]
                upsampled = upsampled + self.position_encoding(sh, sw, grid.device).to(grid.dtype)
            if region_tokens_only and stage == last:
                out.queries = block.region_path(queries, upsampled, blocked)
                return out
            queries, features = block(queries, upsampled, blocked, padding)
            mask_logits, class_logits = self.segmentation_cls_head(queries, features)
            out.multi_scale_features.append(features)
            out.head_mask_logits.append(mask_logits)
            out.head_class_logits.append(class_logits)
        # The official code calls the head once more on the final features: same values as the last call.
        out.queries, out.seg_logits, out.class_logits = queries, mask_logits, class_logits
        return out

    @property
    def attention_implementation(self) -> str:
        return self.init_cross_attn.implementation

    @attention_implementation.setter
    def attention_implementation(self, name: str) -> None:
        if name not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, not {name!r}")
        for module in self.modules():
            if isinstance(module, CrossAttention):
                module.implementation = name

    def decode(
        self,
        grid: torch.Tensor,
        codes: torch.Tensor,
        query_mask: torch.Tensor | None = None,
        grid_features: GridFeatures | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode region codes into masks: the whole forward re-run with the codes as initial queries.

        The K codes of one sample are decoded jointly (they interact through image->region attention).
        `grid_features`: the encode pass's `GridFeatures` of the same grid, when kept (same result, less work).

        Returns:
            seg_logits (B, K, 8h, 8w) and class_logits (B, K, C+1).
        """
        out = self.forward(grid, codes, query_mask, grid_features)
        return out.seg_logits, out.class_logits


class CastDecode:
    """Mask decoding by a copy of the perceiver in another dtype (the `decode` of `MedSIGHTModel.decode_regions`).

    An approximate speed lever, off by default: the region tokens, and so the generated text, come from the model's
    own perceiver and stay exact; only the mask logits move (bf16 on a CPU with bf16 units: 2.3-2.5x faster demo
    decode, mask logits within ~0.55, benchmarks/speed_levers.py). The copy follows the source's attention kernel.
    """

    def __init__(self, perceiver: RegionPerceiver, dtype: torch.dtype) -> None:
        self.source = perceiver
        self.dtype = dtype
        self.perceiver = copy.deepcopy(perceiver).to(dtype)

    def __call__(self, grids: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.perceiver.attention_implementation = self.source.attention_implementation
        masks, classes = self.perceiver.decode(grids.to(self.dtype), codes.to(self.dtype))
        return masks.to(grids.dtype), classes.to(grids.dtype)
