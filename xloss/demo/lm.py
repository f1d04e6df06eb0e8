"""A character-level transformer language model on Python's own documentation.

The text is the pydoc topics corpus that ships with CPython (``pydoc_data.topics``): about
465k characters of English prose and code. Each topic is cut into pieces of whole lines of
at most ``context - 1`` characters, so the pieces have naturally varying lengths; a batch
pads them to its longest piece and the loss drops the padded positions with a mask.

The model returns hidden states, not logits: the loss,
:class:`xloss.LinearCrossEntropyLoss`, takes them together with the output embedding
weight and never builds the (tokens x vocabulary) logits.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import xloss
from xloss.demo.metrics import ReliabilityBins, expected_calibration_error, reliability_bins

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


@dataclass
class LMConfig:
    context: int = 64  # longest piece, counting the <bos> token
    dim: int = 64
    layers: int = 2
    heads: int = 4
    batch_size: int = 48
    steps: int = 400
    lr: float = 1e-2
    warmup: int = 30
    eval_every: int = 50
    min_char_count: int = 20  # rarer characters become <unk>
    validation_share: float = 0.1
    max_eval_pieces: int | None = None  # cap of validation pieces (quick runs)


@dataclass
class Corpus:
    vocab: list[str]
    train: list[Tensor]  # each piece: <bos> c_1 ... c_n <eos>, int64
    valid: list[Tensor]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def split_into_pieces(text: str, max_chars: int) -> list[str]:
    """Greedily join whole lines (without trailing blanks) into pieces of <= max_chars."""
    pieces, current = [], ""
    for line in text.split("\n"):
        line = line.rstrip()[:max_chars]
        if not line:
            if current:
                pieces.append(current)
            current = ""
        elif not current:
            current = line
        elif len(current) + 1 + len(line) <= max_chars:
            current += "\n" + line
        else:
            pieces.append(current)
            current = line
    if current:
        pieces.append(current)
    return pieces


def load_corpus(config: LMConfig, seed: int = 0) -> Corpus:
    """Pieces of the pydoc topics, split into train and validation by topic (seeded)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    random.Random(seed).shuffle(names)
    total = sum(len(topics[name]) for name in names)
    valid_names, valid_chars = set(), 0
    for name in names:  # held-out topics until they hold validation_share of the text
        if valid_chars >= config.validation_share * total:
            break
        valid_names.add(name)
        valid_chars += len(topics[name])

    train_text = [topics[n] for n in names if n not in valid_names]
    counts = Counter("".join(train_text))
    chars = sorted(c for c, k in counts.items() if k >= config.min_char_count)
    vocab = list(SPECIALS) + chars
    index = {c: i for i, c in enumerate(vocab)}

    def encode(piece: str) -> Tensor:
        ids = [BOS] + [index.get(c, UNK) for c in piece] + [EOS]
        return torch.tensor(ids, dtype=torch.int64)

    def pieces_of(selected: list[str]) -> list[Tensor]:
        return [
            encode(p) for n in selected for p in split_into_pieces(topics[n], config.context - 1)
        ]

    return Corpus(
        vocab=vocab,
        train=pieces_of([n for n in names if n not in valid_names]),
        valid=pieces_of(sorted(valid_names)),
    )


def pad_batch(pieces: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(inputs, targets, mask), each (B, T): next-character targets, padding masked out."""
    steps = max(len(p) for p in pieces) - 1
    inputs = torch.full((len(pieces), steps), PAD, dtype=torch.int64)
    targets = torch.full((len(pieces), steps), PAD, dtype=torch.int64)
    for row, piece in enumerate(pieces):
        inputs[row, : len(piece) - 1] = piece[:-1]
        targets[row, : len(piece) - 1] = piece[1:]
    lengths = torch.tensor([len(p) - 1 for p in pieces])
    mask = torch.arange(steps) < lengths[:, None]
    return inputs, targets, mask


class Block(nn.Module):
    """Pre-norm transformer block with causal self-attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        batch, steps, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(dim, dim=-1)
        q, k, v = (t.view(batch, steps, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        # Padding sits at the end of each row, so a causal mask already keeps every real
        # position from seeing it.
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, steps, dim))
        return x + self.mlp(self.norm2(x))


class CharTransformer(nn.Module):
    """Returns hidden states (B, T, dim); ``output_embedding`` (V, dim) maps them to logits."""

    def __init__(self, vocab_size: int, config: LMConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, config.dim)
        self.position = nn.Parameter(torch.randn(config.context, config.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(config.dim, config.heads) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)
        self.output_embedding = nn.Parameter(torch.randn(vocab_size, config.dim) * 0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embedding(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


@dataclass
class LMResult:
    label_smoothing: float
    train_loss: list[float] = field(default_factory=list)  # per step, as optimised
    valid_steps: list[int] = field(default_factory=list)
    valid_ce: list[float] = field(default_factory=list)  # unsmoothed, nats per char
    perplexity: float = math.nan
    ece: float = math.nan
    accuracy: float = math.nan
    reliability: ReliabilityBins | None = None
    seconds: float = math.nan


def make_loss(label_smoothing: float) -> nn.Module:
    """The training loss: hidden states + output embedding -> masked, smoothed CE."""
    return xloss.LinearCrossEntropyLoss(label_smoothing=label_smoothing)


@torch.no_grad()
def evaluate(model: CharTransformer, pieces: list[Tensor], batch_size: int = 64):
    """Unsmoothed validation CE (nats/char), and top-1 confidences and hits, valid positions.

    Evaluation needs the probabilities themselves (for calibration), so here the logits of
    the valid positions are built; with 97 characters they are small.
    """
    model.eval()
    total, count, confidences, hits = 0.0, 0, [], []
    for start in range(0, len(pieces), batch_size):
        inputs, targets, mask = pad_batch(pieces[start : start + batch_size])
        logits = model(inputs)[mask] @ model.output_embedding.T  # valid positions x V
        kept = targets[mask]
        total += float(F.cross_entropy(logits, kept, reduction="sum"))
        count += kept.numel()
        confidence, predicted = logits.softmax(-1).max(-1)
        confidences.append(confidence)
        hits.append(predicted == kept)
    model.train()
    return total / count, torch.cat(confidences), torch.cat(hits)


def train_lm(
    corpus: Corpus,
    config: LMConfig,
    label_smoothing: float,
    seed: int = 0,
    progress: bool = True,
) -> tuple[CharTransformer, LMResult]:
    """Train from the same seed with the given label smoothing; evaluate on validation."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = CharTransformer(corpus.vocab_size, config)
    loss_fn = make_loss(label_smoothing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)

    def learning_rate(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress_share = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_share))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate)
    valid = corpus.valid[: config.max_eval_pieces]
    order = random.Random(seed)
    result = LMResult(label_smoothing=label_smoothing)
    started = time.perf_counter()
    bar = tqdm(
        range(config.steps), desc=f"LM eps={label_smoothing:g}", disable=not progress, leave=False
    )
    for step in bar:
        inputs, targets, mask = pad_batch(order.sample(corpus.train, config.batch_size))
        hidden = model(inputs)  # B x T x dim
        loss = loss_fn(hidden, model.output_embedding, targets, mask=mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        result.train_loss.append(loss_value)
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            ce, _, _ = evaluate(model, valid)
            result.valid_steps.append(step + 1)
            result.valid_ce.append(ce)
            bar.set_postfix(loss=f"{loss_value:.3f}", valid_ppl=f"{math.exp(ce):.2f}")
    bar.close()
    result.seconds = time.perf_counter() - started

    ce, confidence, correct = evaluate(model, valid)
    result.perplexity = math.exp(ce)
    result.ece = expected_calibration_error(confidence, correct, bins=15)
    result.accuracy = float(correct.double().mean())
    result.reliability = reliability_bins(confidence, correct, bins=15)
    return model, result


def unigram_perplexity(corpus: Corpus, valid: list[Tensor]) -> float:
    """Perplexity on ``valid`` of the training set's character frequencies (add-one)."""
    targets = torch.cat([p[1:] for p in corpus.train])
    counts = torch.bincount(targets, minlength=corpus.vocab_size).double() + 1
    log_prob = (counts / counts.sum()).log()
    valid_targets = torch.cat([p[1:] for p in valid])
    return math.exp(float(-log_prob[valid_targets].mean()))
