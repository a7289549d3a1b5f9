"""SLATE (Singh, Deng & Ahn, ICLR 2022, "Illiterate DALL-E learns to compose"): slots decoded by an autoregressive
transformer over discrete image tokens.

Stage 1, :class:`DiscreteVAE` (dVAE), turns every 4x4 patch into one of V tokens:

    image [B, 3, H, W] -> CNN (stride 4) -> logits [B, V, H/4, W/4]
    relaxed one-hot  z = gumbel_softmax(logits, tau)   (tau annealed from tau_start to tau_end)
    loss = || decoder(z) - image ||^2;   tokens = argmax(logits): the targets of stage 2

Stage 2, :class:`Slate`, keeps the dVAE frozen:

    tokens [B, N] -> embedding + learned positions u [B, N, D] -> LayerNorm + MLP -> Slot Attention -> slots [B, K, S]
    decoder input: [BOS, u_1, ..., u_{N-1}] + positions -> transformer (causal self-attention, cross-attention to
    the slots) -> logits over the next token [B, N, V];   loss = cross-entropy(logits, tokens)

``decode(slots)`` samples the N tokens one by one (greedy, or with a temperature and a seeded generator), reusing the
keys and values of the tokens already drawn (a cache), and turns them into pixels with the dVAE's decoder. SLATE has
no alpha masks: object masks are Slot Attention's attention of the last iteration over the N patches (the same maps
that pooled each slot's content), upsampled bilinearly to the image, as in the SLATE paper's figures.

Attention is PyTorch's ``scaled_dot_product_attention``; the blocks are written out only to give them a key/value
cache, which ``nn.TransformerDecoder`` lacks.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from slotlab.models.autoencoder import AutoencoderOutput
from slotlab.models.broadcast_decoder import DecoderOutput
from slotlab.models.slot_attention import GroupingOutput, attention_masks, build_grouping

PATCH = 4  # pixels per token side: the dVAE's encoder has stride 4


# ------------------------------------------------------------------------------------------------ stage 1: dVAE
class DiscreteVAE(nn.Module):
    """A 4x4 patch -> one of ``slate.vocab_size`` tokens -> back to pixels (the dVAE of SLATE / DALL-E).

    Args:
        config: the run's :class:`~slotlab.config.Config` (``slate``: vocabulary, width, temperature schedule).
    """

    def __init__(self, config):
        super().__init__()
        cfg = config.slate
        vocab, width = cfg.vocab_size, cfg.dvae_channels
        self.config = config
        self.vocab_size = vocab
        self.downsample = PATCH
        self.encoder = nn.Sequential(
            nn.Conv2d(3, width, PATCH, stride=PATCH), nn.ReLU(),  # one vector per 4x4 patch
            nn.Conv2d(width, width, 1), nn.ReLU(),
            nn.Conv2d(width, width, 1), nn.ReLU(),
            nn.Conv2d(width, vocab, 1),  # logits over the vocabulary
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(vocab, width, 1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width * 4, 1), nn.PixelShuffle(2),  # x2
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width * 4, 1), nn.PixelShuffle(2),  # x4
            nn.Conv2d(width, 3, 3, padding=1),
        )

    def temperature(self, step: int) -> float:
        """Gumbel-softmax temperature: cosine from ``tau_start`` to ``tau_end`` over ``tau_steps``, then constant."""
        cfg = self.config.slate
        progress = min(step / cfg.tau_steps, 1.0)
        return cfg.tau_end + 0.5 * (cfg.tau_start - cfg.tau_end) * (1.0 + math.cos(math.pi * progress))

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """``image [B, 3, H, W]`` -> token logits ``[B, V, H/4, W/4]``."""
        return self.encoder(image)

    def relaxed_tokens(self, image: torch.Tensor, tau: float, hard: bool = False) -> torch.Tensor:
        """Gumbel-softmax sample ``[B, V, h, w]`` (``hard``: one-hot forward, the relaxed gradient backward)."""
        return F.gumbel_softmax(self.logits(image), tau=tau, hard=hard, dim=1)  # [B, V, h, w]

    @torch.no_grad()
    def tokens(self, image: torch.Tensor) -> torch.Tensor:
        """``image [B, 3, H, W]`` -> token ids ``[B, h, w]`` (argmax: what stage 2 learns to predict)."""
        return self.logits(image).argmax(dim=1)  # [B, h, w]

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, h, w]`` -> image ``[B, 3, H, W]``."""
        one_hot = F.one_hot(tokens, self.vocab_size).permute(0, 3, 1, 2).float()  # [B, V, h, w]
        return self.decoder(one_hot)

    # The interface of slotlab's image VAE, so that its evaluator (MSE, PSNR, pictures) scores the dVAE too.
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` -> one-hot tokens ``[B, V, h, w]``."""
        return F.one_hot(self.tokens(image), self.vocab_size).permute(0, 3, 1, 2).float()

    def decode(self, one_hot: torch.Tensor) -> torch.Tensor:
        return self.decoder(one_hot)

    def compute_loss(self, batch: dict[str, torch.Tensor], step: int = 0) -> tuple[torch.Tensor, dict]:
        """MSE of the reconstruction from a relaxed one-hot sample at this step's temperature."""
        image = batch["image"]
        tau = self.temperature(step)
        recon = self.decoder(self.relaxed_tokens(image, tau))  # [B, 3, H, W]
        mse = F.mse_loss(recon.float(), image.float())
        return mse, {"mse": mse.detach(), "tau": torch.tensor(tau)}


# ------------------------------------------------------------------------------------------------ stage 2: SLATE
class DecoderBlock(nn.Module):
    """Pre-norm transformer decoder block: causal self-attention, cross-attention to the slots, MLP."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm_self, self.norm_cross, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.self_out = nn.Linear(dim, dim)
        self.cross_q = nn.Linear(dim, dim, bias=False)
        self.cross_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.cross_out = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # [B, H, T, D/H]

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, h, t, e = x.shape
        return x.transpose(1, 2).reshape(b, t, h * e)  # [B, T, D]

    def slot_keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention's keys and values of the slots ``[B, K, D]``: computed once per image."""
        k, v = self.cross_kv(memory).chunk(2, dim=-1)  # 2 x [B, K, D]
        return self._split(k), self._split(v)  # 2 x [B, H, K, D/H]

    def forward(self, x: torch.Tensor, slot_kv: tuple[torch.Tensor, torch.Tensor],
                cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``x [B, T, D]`` -> ``[B, T, D]``. Without ``cache``, T tokens attend causally to each other; with it, the
        new tokens attend to the cached keys / values of the earlier ones too, and are appended to the cache."""
        drop = self.dropout if self.training else 0.0
        q, k, v = (self._split(part) for part in self.qkv(self.norm_self(x)).chunk(3, dim=-1))  # 3 x [B, H, T, E]
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)  # [B, H, t + T, E]
            cache["k"], cache["v"] = k, v
        # A single new token may see every cached one; a whole sequence (training, or no cache) is masked causally.
        causal = q.shape[2] > 1
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=causal)  # [B, H, T, E]
        x = x + F.dropout(self.self_out(self._merge(attended)), drop, self.training)
        q = self._split(self.cross_q(self.norm_cross(x)))  # [B, H, T, E]
        attended = F.scaled_dot_product_attention(q, *slot_kv, dropout_p=drop)  # [B, H, T, E]
        x = x + F.dropout(self.cross_out(self._merge(attended)), drop, self.training)
        return x + self.mlp(self.norm_mlp(x))


class Slate(nn.Module):
    """Slot Attention over dVAE tokens + an autoregressive transformer decoder (SLATE).

    Offers :class:`~slotlab.models.SlotAutoencoder`'s interface (``encode``, ``decode``, ``forward``,
    ``predict_masks``, ``compute_loss``), so ``slotlab eval``, ``library``, ``compose``, ``mix`` and ``report`` take
    SLATE runs as they are.

    Args:
        config: the run's config (``model``: Slot Attention; ``slate``: the dVAE and the transformer).
    """

    def __init__(self, config):
        super().__init__()
        cfg, model_cfg = config.slate, config.model
        resolution = config.data.resolution
        self.config = config
        self.num_slots = model_cfg.num_slots
        self.slot_size = model_cfg.slot_dim
        self.dvae = DiscreteVAE(config).requires_grad_(False).eval()
        self.token_grid = (resolution // PATCH, resolution // PATCH)  # (h, w)
        num_tokens, dim = self.token_grid[0] * self.token_grid[1], cfg.d_model
        self.token_embedding = nn.Embedding(cfg.vocab_size, dim)
        self.bos = nn.Parameter(torch.zeros(1, 1, dim))
        self.positions = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)  # [1, N, D]
        self.to_inputs = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, model_cfg.input_dim), nn.ReLU(),
            nn.Linear(model_cfg.input_dim, model_cfg.input_dim),
        )
        self.grouping = build_grouping(model_cfg)
        self.slots_to_memory = nn.Linear(model_cfg.slot_dim, dim, bias=False)
        self.blocks = nn.ModuleList(DecoderBlock(dim, cfg.num_heads, cfg.dropout) for _ in range(cfg.num_layers))
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, cfg.vocab_size))

    def train(self, mode: bool = True) -> Slate:
        super().train(mode)
        self.dvae.eval()  # frozen: always in inference mode
        return self

    # ------------------------------------------------------------------------------------------------ encoder
    def encode(self, image: torch.Tensor, num_slots: int | None = None) -> tuple[GroupingOutput, tuple[int, int]]:
        """``image [B, 3, H, W]`` -> slots ``[B, K, S]`` and attention ``[B, K, N]`` over the token grid."""
        tokens = self.dvae.tokens(image).flatten(1)  # [B, N]
        return self._group(tokens, num_slots), self.token_grid

    def _group(self, tokens: torch.Tensor, num_slots: int | None = None) -> GroupingOutput:
        embedded = self.token_embedding(tokens) + self.positions  # [B, N, D]
        return self.grouping(self.to_inputs(embedded), num_slots=num_slots)

    # ------------------------------------------------------------------------------------------------ decoder
    def _memory(self, slots: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        memory = self.slots_to_memory(slots)  # [B, K, D]
        return [block.slot_keys_values(memory) for block in self.blocks]

    def next_token_logits(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits ``[B, N, V]`` of every token given the tokens before it ``tokens [B, N]``."""
        b = tokens.shape[0]
        shifted = torch.cat([self.bos.expand(b, -1, -1), self.token_embedding(tokens[:, :-1])], dim=1)  # [B, N, D]
        x = shifted + self.positions
        for block, slot_kv in zip(self.blocks, self._memory(slots)):
            x = block(x, slot_kv)
        return self.head(x)  # [B, N, V]

    def compute_loss(self, batch: dict[str, torch.Tensor], step: int = 0) -> tuple[torch.Tensor, dict]:
        """Cross-entropy of the next dVAE token, given the slots and the tokens before it."""
        tokens = self.dvae.tokens(batch["image"]).flatten(1)  # [B, N]
        logits = self.next_token_logits(tokens, self._group(tokens).slots)  # [B, N, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        return loss, {"cross_entropy": loss.detach()}

    @torch.no_grad()
    def sample_tokens(self, slots: torch.Tensor, temperature: float | None = None,
                      generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
        """Draw the N tokens one after the other: ``slots [B, K, S]`` -> token ids ``[B, N]``.

        Args:
            temperature: 0 = greedy (argmax); above 0, sample from softmax(logits / temperature)
                (default ``slate.temperature``).
            generator: random source of the draws (CPU generator; None = torch's global one).
            use_cache: reuse the keys and values of the tokens drawn so far (same tokens, about N/2 times fewer
                token passes); without it every step runs the whole prefix again.
        """
        temperature = self.config.slate.temperature if temperature is None else temperature
        b, n = slots.shape[0], self.positions.shape[1]
        memory = self._memory(slots)
        caches = [{} for _ in self.blocks]
        tokens = torch.zeros(b, 0, dtype=torch.long, device=slots.device)
        for t in range(n):
            if use_cache:  # only the newest input: BOS at t = 0, else the token drawn last
                new = self.bos.expand(b, -1, -1) if t == 0 else self.token_embedding(tokens[:, -1:])  # [B, 1, D]
                x = new + self.positions[:, t:t + 1]
            else:  # the whole prefix again
                x = torch.cat([self.bos.expand(b, -1, -1), self.token_embedding(tokens)], dim=1)  # [B, t + 1, D]
                x = x + self.positions[:, :t + 1]
            for block, slot_kv, cache in zip(self.blocks, memory, caches):
                x = block(x, slot_kv, cache if use_cache else None)
            logits = self.head(x[:, -1]).float()  # [B, V]
            if temperature <= 0:
                token = logits.argmax(dim=-1)  # [B]
            else:
                probs = torch.softmax(logits / temperature, dim=-1).cpu()
                token = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(slots.device)  # [B]
            tokens = torch.cat([tokens, token[:, None]], dim=1)  # [B, t + 1]
        return tokens

    @torch.no_grad()
    def decode(self, slots: torch.Tensor, temperature: float | None = None, generator: torch.Generator | None = None,
               seed: int | None = None, use_cache: bool = True) -> DecoderOutput:
        """Sample an image for each slot set ``[B, K, S]``: tokens by :meth:`sample_tokens`, pixels by the dVAE.

        ``seed`` makes a CPU generator when ``generator`` is None. Returns ``recon [B, 3, H, W]`` in [-1, 1] and no
        masks (see :meth:`predict_masks`).
        """
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        tokens = self.sample_tokens(slots, temperature, generator, use_cache)  # [B, N]
        image = self.dvae.decode_tokens(tokens.view(-1, *self.token_grid))  # [B, 3, H, W]
        return DecoderOutput(recon=image.float().clamp(-1.0, 1.0))

    # ------------------------------------------------------------------------------------------------ interface
    def forward(self, image: torch.Tensor, num_slots: int | None = None) -> AutoencoderOutput:
        """Encode, then sample a reconstruction from the slots."""
        grouped, feature_size = self.encode(image, num_slots)
        decoded = self.decode(grouped.slots)
        return AutoencoderOutput(
            recon=decoded.recon, masks=attention_masks(grouped.attn, feature_size, tuple(image.shape[-2:])),
            slot_recons=None, slots=grouped.slots, attn=grouped.attn, attn_per_iter=grouped.attn_per_iter,
            feature_size=feature_size,
        )

    @torch.no_grad()
    def predict_masks(self, image: torch.Tensor) -> torch.Tensor:
        """Object masks ``[B, K, H, W]`` from the last Slot Attention iteration (no sampling: cheap)."""
        grouped, feature_size = self.encode(image)
        return attention_masks(grouped.attn, feature_size, tuple(image.shape[-2:]))

