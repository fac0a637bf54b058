"""The reference foundation model: a target-aware sequence model shipped as code.

The user side (a user token and the user's recent items, encoded by a small transformer) is
computed once per user in a batch; the candidate side (the candidate attends over that
encoding, then an MLP maps to the latent) is the only per-pair work. The two meet through
`candidate_user`, which says which user row each candidate belongs to.

All ids arrive already hashed into table rows (see `features.py`); row 0 is padding.
"""

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

INPUT_NAMES = ("user", "history", "history_length", "candidate", "candidate_user")
OUTPUT_NAMES = ("embeddings",)


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the reference model. The defaults cost about 10 MFLOP per pair (see docs)."""

    dim: int = 128
    model_width: int = 128
    heads: int = 4
    layers: int = 2
    feedforward_width: int = 512
    mlp_width: int = 1024
    history_cap: int = 64
    item_buckets: int = 1 << 16
    user_buckets: int = 1 << 14
    seed: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class EncoderBlock(nn.Module):
    """Pre-norm self-attention and feed-forward over a padded sequence."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        width = config.model_width
        self.heads = config.heads
        self.norm_attention = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm_feedforward = nn.LayerNorm(width)
        self.feedforward = nn.Sequential(
            nn.Linear(width, config.feedforward_width),
            nn.GELU(),
            nn.Linear(config.feedforward_width, width),
        )

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        query, key, value = self.qkv(self.norm_attention(x)).chunk(3, dim=-1)
        x = x + self.out(attend(query, key, value, valid, self.heads))
        mixed: torch.Tensor = x + self.feedforward(self.norm_feedforward(x))
        return mixed


def attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor, heads: int
) -> torch.Tensor:
    """Multi-head attention of `query` (B, Q, W) over `key`/`value` (B, K, W); `valid` (B, K)."""
    batch, queries, width = query.shape
    head_width = width // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], heads, head_width).transpose(1, 2)

    scores = split(query) @ split(key).transpose(-1, -2) / math.sqrt(head_width)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    mixed = torch.softmax(scores, dim=-1) @ split(value)
    return mixed.transpose(1, 2).reshape(batch, queries, width)


class ReferenceModel(nn.Module):
    """(user, history, candidate) -> a `dim`-wide latent for the pair."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        width = config.model_width
        self.item_table = nn.Embedding(config.item_buckets, width, padding_idx=0)
        self.user_table = nn.Embedding(config.user_buckets, width)
        self.position = nn.Parameter(torch.randn(config.history_cap + 1, width) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.layers))
        self.norm_user = nn.LayerNorm(width)
        self.key_value = nn.Linear(width, 2 * width)
        self.candidate_query = nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(4 * width, config.mlp_width),
            nn.GELU(),
            nn.Linear(config.mlp_width, config.mlp_width),
            nn.GELU(),
            nn.Linear(config.mlp_width, config.dim),
        )

    def encode_users(
        self, user: torch.Tensor, history: torch.Tensor, history_length: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The user side, once per user: (user vector, keys, values, valid mask)."""
        tokens = torch.cat([self.user_table(user)[:, None, :], self.item_table(history)], dim=1)
        x = tokens + self.position[: tokens.shape[1]]
        positions = torch.arange(tokens.shape[1], device=user.device)
        valid = positions[None, :] <= history_length[:, None]
        for block in self.blocks:
            x = block(x, valid)
        x = self.norm_user(x)
        key, value = self.key_value(x).chunk(2, dim=-1)
        return x[:, 0], key, value, valid

    def score_candidates(
        self,
        candidate: torch.Tensor,
        candidate_user: torch.Tensor,
        encoded: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """The per-pair side: each candidate attends over its own user's encoding."""
        user_vector, key, value, valid = (part[candidate_user] for part in encoded)
        item = self.item_table(candidate)
        query = self.candidate_query(item)[:, None, :]
        attended = attend(query, key, value, valid, self.config.heads)[:, 0]
        latent: torch.Tensor = self.mlp(
            torch.cat([item, attended, user_vector, item * attended], -1)
        )
        return latent

    def forward(
        self,
        user: torch.Tensor,
        history: torch.Tensor,
        history_length: torch.Tensor,
        candidate: torch.Tensor,
        candidate_user: torch.Tensor,
    ) -> torch.Tensor:
        encoded = self.encode_users(user, history, history_length)
        return self.score_candidates(candidate, candidate_user, encoded)


def build_model(config: ModelConfig, checkpoint: str | None = None) -> ReferenceModel:
    """The model with weights from `config.seed`, or from a state_dict file a user supplies."""
    torch.manual_seed(config.seed)
    model = ReferenceModel(config)
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model.eval()


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def flops(model: ReferenceModel) -> tuple[int, int]:
    """Measured FLOPs of (one user's side at full history, one candidate's side)."""
    from torch.utils.flop_counter import FlopCounterMode

    config = model.config
    user = torch.ones(1, dtype=torch.int64)
    history = torch.ones(1, config.history_cap, dtype=torch.int64)
    length = torch.full((1,), config.history_cap, dtype=torch.int64)
    with torch.no_grad(), FlopCounterMode(display=False) as user_side:
        encoded = model.encode_users(user, history, length)
    with torch.no_grad(), FlopCounterMode(display=False) as candidate_side:
        model.score_candidates(user, torch.zeros(1, dtype=torch.int64), encoded)
    return user_side.get_total_flops(), candidate_side.get_total_flops()
