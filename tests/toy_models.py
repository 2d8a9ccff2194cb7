"""Small models with the properties the tracer must handle; also a model-spec
target (``tests/toy_models.py:NAME``) in the CLI tests."""

import torch
import torch.nn.functional as F
from torch import nn


class Gate(nn.Module):
    """Branches on tensor values: fx cannot trace it, so it becomes a leaf."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent
            return self.fc(x)
        return -self.fc(x)


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 16)
        self.gate = Gate()
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.relu(self.gate(self.inp(x))))


class PadToMultiple(nn.Module):
    """Branches on a shape: fx fails, the shape branch is specialised."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        n = x.shape[1]
        if n % 4 != 0:
            x = F.pad(x, (0, 0, 0, 4 - n % 4))
        return self.fc(x)


class PerToken(nn.Module):
    """Loops over a dimension in its own forward: fx cannot trace the root, torch.export can."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        tokens = [self.fc(x[:, i]) for i in range(x.shape[1])]
        return self.norm(torch.stack(tokens, dim=1) + x)


class DataDependentRoot(nn.Module):
    """Neither front end can trace a value-dependent branch in the model's own forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


class GluMlp(nn.Module):
    def __init__(self, dim=16, hidden=32):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(a) * b)


class TokensWithPosEmbed(nn.Module):
    """x + pos_embed is no residual; x + mlp(norm(x)) is one (a gated mlp)."""

    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 16))
        self.norm = nn.LayerNorm(16)
        self.mlp = GluMlp()

    def forward(self, x):
        x = x + self.pos_embed
        return x + self.mlp(self.norm(x))


def build_gated_net():
    return GatedNet()


def build_per_token():
    return PerToken()


def build_data_dependent_root():
    return DataDependentRoot()


def not_a_model():
    return 42


def transformer_encoder(layers: int = 2, width: int = 32):
    layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


shared_linear = nn.Linear(4, 4)  # a spec may name a module instance
