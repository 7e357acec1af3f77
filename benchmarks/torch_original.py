"""PyTorch models written to the PyTorch original's numerics, for same-run speed comparisons (benchmark only).

Each class follows the original module it names (reference semantics, in our words): the foundry decoder
(fused ``in_proj``, NeoX rotary, SDPA, SwiGLU ``w12``/``w3``, LayerNorm eps 1e-5), the ViT (conv patch embedding,
pre-norm blocks, tanh GELU, LN eps 1e-6), the VLM (ViT -> bias-free projector -> ``masked_scatter`` into the token
embeddings), the diffusion policy (ViT backbone per camera, concat time token, proprio and action tokens through a
non-causal decoder, velocity MSE on the future steps) and the own UNet (GN8 resnets, single-head self-attention
from level 2, transposed-conv upsampling). The optimizer is the original's AdamW with its two parameter groups
(no decay on biases and ``*norm*``) and a warmup + cosine ``LambdaLR``. torch is imported only by benchmarks.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def adamw(model: nn.Module, *, lr: float = 1e-4, wd: float = 0.01, warmup: int = 10, total: int = 1000):
    """The original's optimizer: AdamW (betas 0.9 / 0.95, eps 1e-8), two groups, warmup + cosine schedule."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or "norm" in name.lower() else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_step_fn(model: nn.Module, loss_fn, *, clip: float | None = None):
    """``step(*inputs)``: zero_grad, forward + loss, backward, (clip), optimizer and schedule step."""
    opt, sched = adamw(model)

    def step(*inputs) -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(*inputs)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        return loss.detach()

    return step


# ----------------------------------------------------------------------------------------------- decoder


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self._len, self._cos, self._sin = 0, None, None

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        S = q.shape[1]
        if S > self._len or self._cos.dtype != k.dtype:
            angle = torch.outer(torch.arange(S, dtype=torch.float32), self.inv_freq.to(k.dtype))
            emb = torch.cat((angle, angle), dim=-1)
            self._cos, self._sin, self._len = emb.cos()[None, :, None].to(k.dtype), emb.sin()[None, :, None], S
            self._sin = self._sin.to(k.dtype)
        cos, sin = self._cos[:, :S], self._sin[:, :S]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class Attention(nn.Module):
    def __init__(self, H: int, nh: int):
        super().__init__()
        self.nh = nh
        self.in_proj = nn.Linear(H, 3 * H, bias=False)
        self.out_proj = nn.Linear(H, H, bias=False)
        self.pos_embed = RotaryEmbedding(H // nh)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        B, S, H = x.shape
        q, k, v = (t.view(B, S, self.nh, H // self.nh) for t in self.in_proj(x).chunk(3, dim=-1))
        q, k = self.pos_embed(q, k)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal and S > 1
        )
        return self.out_proj(out.transpose(1, 2).reshape(B, S, H))


class SwiGLU(nn.Module):
    def __init__(self, H: int):
        super().__init__()
        hidden = 256 * math.ceil((8 * H // 3) / 256)
        self.w12 = nn.Linear(H, 2 * hidden, bias=False)
        self.w3 = nn.Linear(hidden, H, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, H: int, nh: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(H, eps=1e-5)
        self.attention = Attention(H, nh)
        self.ffn_norm = nn.LayerNorm(H, eps=1e-5)
        self.feed_forward = SwiGLU(H)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), causal)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The foundry decoder; ``vocab = 0`` builds it without token table and head (a policy's denoiser)."""

    def __init__(self, H: int, L: int, nh: int, vocab: int = 50432, *, post_embed_norm: bool = False, causal=True):
        super().__init__()
        self.causal = causal
        self.embeddings = nn.Embedding(vocab, H) if vocab else None
        self.post_embed_norm = nn.LayerNorm(H, eps=1e-5) if post_embed_norm else nn.Identity()
        self.layers = nn.ModuleList([Block(H, nh) for _ in range(L)])
        self.norm = nn.LayerNorm(H, eps=1e-5)
        self.output = nn.Linear(H, vocab, bias=False) if vocab else None

    def hidden(self, input_ids=None, inputs_embeds=None) -> torch.Tensor:
        """The last block's output (before the final norm)."""
        x = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        x = self.post_embed_norm(x)
        for layer in self.layers:
            x = layer(x, self.causal)
        return x

    def forward(self, input_ids=None, inputs_embeds=None) -> torch.Tensor:
        return self.output(self.norm(self.hidden(input_ids, inputs_embeds)))


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy on ``ids [B, S+1]`` (the original's handler, z-loss 0)."""
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


# ----------------------------------------------------------------------------------------------- ViT


class ViTBlock(nn.Module):
    def __init__(self, H: int, nh: int, inter: int, eps: float):
        super().__init__()
        self.nh = nh
        self.ln1, self.ln2 = nn.LayerNorm(H, eps=eps), nn.LayerNorm(H, eps=eps)
        self.qkv_proj, self.out_proj = nn.Linear(H, 3 * H), nn.Linear(H, H)
        self.fc1, self.fc2 = nn.Linear(H, inter), nn.Linear(inter, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.nh, C // self.nh).transpose(1, 2) for t in self.qkv_proj(self.ln1(x)).split(C, 2))
        x = x + self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class ViT(nn.Module):
    """``[B, 3, s, s] -> [B, n_p, H]`` (no CLS token, as vit_tiny)."""

    def __init__(self, img: int, patch: int, H: int, inter: int, nh: int, L: int, eps: float = 1e-6):
        super().__init__()
        self.conv = nn.Conv2d(3, H, patch, patch)
        self.position_embedding = nn.Parameter(torch.rand(1, (img // patch) ** 2, H))
        self.blocks = nn.ModuleList([ViTBlock(H, nh, inter, eps) for _ in range(L)])
        self.layer_norm = nn.LayerNorm(H, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).flatten(2).transpose(1, 2) + self.position_embedding
        for block in self.blocks:
            x = block(x)
        return self.layer_norm(x)


class VLM(nn.Module):
    """ViT -> bias-free projector (pixel shuffle 1) -> scattered into the image-token positions -> decoder."""

    def __init__(self, vit: ViT, lm: Transformer, vit_dim: int, lm_dim: int, image_token_id: int):
        super().__init__()
        self.vit, self.transformer = vit, lm
        self.projection = nn.Linear(vit_dim, lm_dim, bias=False)
        self.image_token_id = image_token_id

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        img = self.projection(self.vit(pixel_values))
        is_img = input_ids == self.image_token_id
        emb = self.transformer.embeddings(input_ids.masked_fill(is_img, 0)).to(img.dtype)
        emb = emb.masked_scatter(is_img[..., None], img)
        return self.transformer(inputs_embeds=emb)


def vlm_loss(model: VLM, ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1], pixel_values)
    targets = ids[:, 1:].masked_fill(ids[:, 1:] == model.image_token_id, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)


# ----------------------------------------------------------------------------------------------- policy


def sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freq = torch.exp(-torch.arange(half, dtype=torch.float32) * math.log(10000) / (half - 1))
    arg = t.float()[:, None] * freq[None]
    return torch.cat((arg.sin(), arg.cos()), dim=-1)


class DiffusionPolicy(nn.Module):
    """ViT backbone (cameras concatenated along tokens), concat time conditioning, flow matching (T steps)."""

    def __init__(self, vit: ViT, denoiser: Transformer, D_bb: int, H_t: int, A: int, P: int, T: int = 1000):
        super().__init__()
        self.backbone, self.transformer, self.T = vit, denoiser, T
        self.time_encoding = nn.Embedding(T, D_bb)
        with torch.no_grad():
            self.time_encoding.weight.copy_(sinusoidal(torch.arange(T), D_bb))
        self.output_layer = nn.Linear(H_t, A)
        self.action_encode = nn.Linear(A, H_t)
        self.condition_encode = nn.Linear(D_bb, H_t)
        self.proprioception_encode = nn.Linear(P, H_t)
        nn.init.xavier_uniform_(self.output_layer.weight)
        nn.init.xavier_uniform_(self.proprioception_encode.weight)

    def conditioning(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B = pixel_values.shape[0]
        return self.backbone(pixel_values.flatten(0, 1)).reshape(B, -1, self.backbone.layer_norm.normalized_shape[0])

    def velocity(self, bb, t, x, prop) -> torch.Tensor:
        te = self.time_encoding(t)[:, None]
        cond = self.condition_encode(torch.cat([te, bb], dim=1))
        act = self.action_encode(x)
        seq = torch.cat([cond, self.proprioception_encode(prop), act], dim=1)
        return self.output_layer(self.transformer.hidden(inputs_embeds=seq)[:, -x.shape[1] :])

    def loss(self, pixel_values, actions, future_mask, proprioception) -> torch.Tensor:
        B = actions.shape[0]
        noise = torch.randn_like(actions)
        t = torch.randint(0, self.T, (B,))
        s = (t.float() / self.T)[:, None, None]
        m = future_mask[..., None].float()
        noisy = (actions + s * (noise - actions) * m).clamp(-3, 3)
        noisy = torch.where(future_mask[..., None], noisy, actions)
        pred = self.velocity(self.conditioning(pixel_values), t, noisy, proprioception)
        mask = m.expand_as(pred)
        return (mask * (pred - (noise - actions)) ** 2).sum() / mask.sum()

    @torch.no_grad()
    def generate_actions(self, pixel_values, actions, past_mask, proprioception, steps: int) -> torch.Tensor:
        bb = self.conditioning(pixel_values)
        pm = past_mask[..., None].float()
        x_past = actions * pm
        x = x_past + torch.randn_like(actions) * (1 - pm)
        step_size = max(1, self.T // steps)
        for t in range(self.T - 1, 0, -step_size):
            v = self.velocity(bb, torch.full((x.shape[0],), t), x, proprioception)
            x = x_past + (x - v * step_size / self.T).clamp(-3, 3) * (1 - pm)
        return x


# ----------------------------------------------------------------------------------------------- UNet


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, E: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(E, cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, t_emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time(t_emb)[:, :, None, None]
        return self.conv2(F.silu(self.norm2(h))) + self.shortcut(x)


class SelfAttention(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.GroupNorm(8, c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, Hh, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, Hh, W)
        return x + self.proj_out(out)


class UNet(nn.Module):
    """The original's own UNet without text conditioning."""

    def __init__(self, channels: list[int], time_emb_dim: int, cin: int = 3):
        super().__init__()
        E, n = 4 * time_emb_dim, len(channels)
        self.time_emb_dim = time_emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_emb_dim, E), nn.SiLU(), nn.Linear(E, E))
        self.init_conv = nn.Conv2d(cin, channels[0], 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        prev = channels[0]
        for i, c in enumerate(channels):
            blocks = [ResnetBlock(prev, c, E), ResnetBlock(c, c, E)] + ([SelfAttention(c)] if i >= 2 else [])
            self.down.append(nn.ModuleList(blocks))
            if i < n - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
            prev = c
        self.mid = nn.ModuleList([ResnetBlock(prev, prev, E), SelfAttention(prev), ResnetBlock(prev, prev, E)])
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        rev = channels[::-1]
        for i, c in enumerate(rev):
            cin_ = prev + c if i > 0 else prev
            blocks = [ResnetBlock(cin_, c, E), ResnetBlock(c, c, E)] + ([SelfAttention(c)] if n - 1 - i >= 2 else [])
            self.up.append(nn.ModuleList(blocks))
            if i < n - 1:
                self.upsample.append(nn.ConvTranspose2d(c, c, 4, stride=2, padding=1))
            prev = c
        self.out_norm, self.out_conv = nn.GroupNorm(8, channels[0]), nn.Conv2d(channels[0], cin, 3, padding=1)

    def _apply(self, blocks, x, t_emb):
        for b in blocks:
            x = b(x, t_emb) if isinstance(b, ResnetBlock) else b(x)
        return x

    def forward(self, x, t):
        t_emb = self.time_mlp(sinusoidal(t, self.time_emb_dim))
        x, skips = self.init_conv(x), []
        for i, blocks in enumerate(self.down):
            x = self._apply(blocks, x, t_emb)
            if i < len(self.downsample):
                skips.append(x)
                x = self.downsample[i](x)
        x = self._apply(self.mid, x, t_emb)
        for i, blocks in enumerate(self.up):
            if i > 0:
                x = torch.cat([x, skips.pop()], dim=1)
            x = self._apply(blocks, x, t_emb)
            if i < len(self.upsample):
                x = self.upsample[i](x)
        return self.out_conv(F.silu(self.out_norm(x)))


def unet_flow_loss(model: UNet, x0: torch.Tensor, T: int = 1000) -> torch.Tensor:
    t = torch.randint(0, T, (x0.shape[0],))
    noise = torch.randn_like(x0)
    s = (t.float() / T)[:, None, None, None]
    return F.mse_loss(model((x0 + s * (noise - x0)).clamp(-1.5, 1.5), t), noise - x0)
