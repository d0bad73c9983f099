"""Training objectives: turn a micro-batch of examples into a differentiable loss.

``SACObjective`` is the method (METHOD.md, "Training recipe"): compress the context with the
encoder, let the frozen decoder (adapter off) read the anchor K/V in the same layout the
``Generator`` uses at inference, and take cross-entropy on the continuation (pretraining) or
answer (QA). Optional extras: several questions per compressed context, synthetic span questions
("which words follow ...", trained by cross-entropy only), distractor passages, distillation
from a teacher reading the full text (the frozen decoder, or the Full-FT model) on its output
distribution and, optionally, on every layer's hidden states or also on the compressor's own
greedy answers (on-policy), minimum risk training on answers it samples, and the +AE ablation.
``FullTextObjective`` trains the "Full-FT" upper bound: a decoder LoRA reading the full text.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from .config import prompt_ids, text_ids
from .data import Paragraph
from .errors import InvalidInputError
from .generation import GenerationConfig, bos_ids, next_tokens
from .metrics import answer_agreement

IGNORE = -100
DISTILL_TOKENS = ("answer", "all")  # which decoder-row tokens the distillation KL covers
# KL(teacher || student) spreads the student over every answer the teacher allows;
# KL(student || teacher) puts it on the teacher's likeliest one (mode seeking).
DISTILL_DIVERGENCES = ("forward", "reverse")
DISTRACTOR_SOURCES = ("random", "same_article")  # where distractor passages are drawn from
# How a loss term averages its tokens (or questions) over a micro-batch. "example": each example's
# mean over its own tokens, then the mean over examples, so that a step weighs every example the
# same however it is split into micro-batches and processes. "micro_batch_tokens": the mean over
# all the micro-batch's tokens at once, which runs before this option (the shipped stages) used:
# there, how examples weigh in a step depends on the micro-batch size.
LOSS_WEIGHTINGS = ("example", "micro_batch_tokens")


@dataclass
class Example:
    """Tokenized training example: passages to compress (in prompt order) and decoder rows.

    Each row reads the prompt ``prefix + passages`` (compressed) and then ``prompt`` tokens as
    text, and is trained to produce ``target`` tokens.
    """

    passages: list[list[int]]
    rows: list[tuple[list[int], list[int]]]
    span_rows: int = 0  # the last rows are synthetic span questions: trained by CE, never distilled


@dataclass
class ExampleBuilder:
    """Builds ``Example``s from raw data with the compressor's prompt template."""

    tokenizer: object
    template: object  # PromptTemplate
    questions_per_context: int = 1
    distractors: int = 0
    distractor_source: str = "random"  # or "same_article": like retrieval, which returns near neighbours
    distractor_share: float = 1.0  # fraction of examples that get distractors; the rest read the gold passage alone
    span_questions: int = 0  # synthetic "which words follow ..." rows per QA example (see ``span_questions_about``)
    max_answer_tokens: int = 48
    lm_min_tokens: int = 510
    lm_max_tokens: int = 2040
    seed: int = 0

    def __post_init__(self) -> None:
        if self.distractor_source not in DISTRACTOR_SOURCES:
            raise InvalidInputError(
                f"distractor_source must be one of {DISTRACTOR_SOURCES}, got {self.distractor_source!r}")
        if self.span_questions < 0:
            raise InvalidInputError(f"span_questions must be >= 0, got {self.span_questions}")
        if self.distractors and getattr(self.template, "context_separator", ""):
            # The objectives read an example's passages back to back; the generator would read the separator
            # text between them, so the model would be trained on another prompt than it answers.
            raise InvalidInputError(f"distractors need a prompt template without a context_separator (got "
                             f"{self.template.context_separator!r}): training lays passages back to back")

    def _ids(self, text: str) -> list[int]:
        """A passage's, answer's or document's ids, read as plain text (``text_ids``), as in answering."""
        return text_ids(self.tokenizer, text)

    @property
    def eos(self) -> int:
        return self.tokenizer.eos_token_id

    def qa(self, paragraph: Paragraph, index: int, pool: list[Paragraph]) -> Example | None:
        """QA example number ``index``: up to ``questions_per_context`` of the paragraph's questions,
        the gold passage shuffled among ``distractors`` passages drawn from ``pool`` (from the
        same article with ``distractor_source="same_article"``, falling back to the whole pool
        when the article has too few other paragraphs). With ``distractor_share`` < 1, only that
        seeded fraction of examples gets distractors, so one run mixes both settings."""
        rng = random.Random(self.seed * 1_000_003 + index)
        questions = rng.sample(paragraph.questions, min(self.questions_per_context, len(paragraph.questions)))
        passages = [paragraph.context] + self._distractors(paragraph, pool, rng)
        rng.shuffle(passages)
        rows = []
        spans = span_questions_about(paragraph.context, self.span_questions, random.Random(f"span {self.seed} {index}"))
        for question, answer in [(qa.question, qa.answers[0]) for qa in questions] + spans:
            rows.append((prompt_ids(self.tokenizer, self.template.question_text(question)), self._target(answer)))
        return Example([self._ids(p) for p in passages], rows, span_rows=len(spans))

    def _target(self, answer: str) -> list[int]:
        """The answer's tokens and the end token; an answer cut at ``max_answer_tokens`` gets no end token
        (it does not end there)."""
        ids = self._ids(answer)
        return ids[: self.max_answer_tokens] + ([self.eos] if len(ids) <= self.max_answer_tokens else [])

    def _distractors(self, paragraph: Paragraph, pool: list[Paragraph], rng: random.Random) -> list[str]:
        """``distractors`` distinct passages other than the gold one (fewer if the pool is smaller)."""
        if not self.distractors:
            return []
        if self.distractor_share < 1.0 and rng.random() >= self.distractor_share:
            return []
        if self.distractor_source == "same_article":
            siblings = list(dict.fromkeys(
                p.context for p in pool if p.title == paragraph.title and p.context != paragraph.context))
            if len(siblings) >= self.distractors:
                return rng.sample(siblings, self.distractors)
        others = list(dict.fromkeys(p.context for p in pool if p.context != paragraph.context))
        return rng.sample(others, min(self.distractors, len(others)))

    def lm(self, text: str, index: int) -> Example | None:
        """Pretraining example: a window of lm_min..lm_max tokens, first half compressed, second
        half (+ EOS) predicted. ``None`` for texts shorter than ``lm_min_tokens``. One seeded window
        per document and epoch: of a document longer than ``lm_max_tokens`` an epoch reads only that
        window (the trainer logs how many documents this concerns and what share they lose)."""
        ids = self._ids(text)
        if len(ids) < self.lm_min_tokens:
            return None
        rng = random.Random(self.seed * 1_000_003 + index)
        length = rng.randint(self.lm_min_tokens, min(self.lm_max_tokens, len(ids)))
        start = rng.randint(0, len(ids) - length)
        window = ids[start : start + length]
        half = length // 2
        continuation = window[half:] + ([self.eos] if start + length == len(ids) else [])
        # The decoder needs one input token to predict from: the first continuation token is
        # read, the rest predicted (the reference code uses a learned [LM] marker instead).
        return Example([window[:half]], [(continuation[:1], continuation[1:])])


SPAN_QUESTION = 'Which words follow "{cue}" in the context?'


def span_questions_about(passage: str, count: int, rng: random.Random, cue_words: int = 4,
                         max_span_words: int = 5) -> list[tuple[str, str]]:
    """Up to ``count`` synthetic extractive questions about ``passage``: the answer is a span of 1 to
    ``max_span_words`` words and the question quotes the ``cue_words`` words before it. Only cues
    that occur once in the passage are used, so each question has one answer. They train the skill
    the compressor lacks most (TRAINING_HISTORY.md, "Where the F1 is lost"): spelling out a span of
    the passage, non-anchor tokens included, that the question locates."""
    words = passage.split()
    starts = list(range(cue_words, len(words)))
    rng.shuffle(starts)
    out = []
    for start in starts:
        if len(out) == count:
            break
        cue = " ".join(words[start - cue_words : start])
        span_words = []
        for word in words[start : start + rng.randint(1, max_span_words)]:
            span_words.append(word)
            if word[-1] in ".,;:!?":  # a span does not run past a clause
                break
        span = " ".join(span_words).strip(".,;:!?\"'()")
        # Checked after drawing the span's length, so the draws (and stage 25's examples) stay as trained.
        if span and passage.count(cue) == 1:
            out.append((SPAN_QUESTION.format(cue=cue), span))
    return out


class SACObjective:
    """Loss of the SAC compressor on a micro-batch; the decoder is the same model in
    ``decoder_mode`` (adapters off, or its own decoder adapter).

    Distillation (``distill_weight`` > 0) adds the KL divergence from a teacher that reads the
    passages as full text to the decoder reading them compressed, at the same positions: the
    frozen base model by default, or ``teacher`` (e.g. the Full-FT model). With
    ``distill_tokens="all"`` it covers every prompt and answer token of each decoder row, not
    only the answer: a question's tokens are predictable from the passage, so the teacher's
    distribution over them says what the passage held (a dense signal; the answer is ~3 tokens).
    ``divergence="reverse"`` uses KL(student || teacher) instead of KL(teacher || student).
    ``temperature`` T divides both models' logits before the softmax and multiplies the KL by T^2
    (Hinton et al.), so at T > 1 the student also matches how the teacher ranks its unlikely tokens;
    the logged ``kl`` is that scaled term.
    ``on_policy_tokens`` > 0 also distils on the student's own answers (on-policy distillation, as
    in GKD): each real question is first answered greedily from the compressed passages (at most
    that many tokens), and where that answer differs from the gold one, the teacher's distribution
    at each of its tokens is matched too. The gold answer alone shows the student the teacher's
    next token after a correct prefix; its own answer shows it how the teacher would go on after
    the prefixes it actually produces. These rows are distilled only, never trained by CE.
    ``risk_weight`` > 0 adds minimum risk training (Shen et al., 2016) on each real question: the
    compressor samples ``risk_samples`` answers of at most ``risk_max_tokens`` tokens (no gradient),
    and the term is the expected cost 1 - F1 (SQuAD's, against the gold answer) over the distinct
    candidates, the gold answer among them, weighted by the softmax of their log-probabilities under
    the compressor. Cross-entropy raises the gold answer only; this also lowers the compressor's own
    wrong answers, each by how far it is from the gold one, which is what greedy and beam search
    then choose between.
    ``hidden_weight`` > 0 adds a denser term at the same positions: the mean over decoder layers
    of the squared distance between the student's and the teacher's layer outputs, each
    RMS-normalised per token (so a few large-magnitude dimensions do not dominate).
    Every term is a mean over the micro-batch as ``weighting`` says (LOSS_WEIGHTINGS): by default each
    example's mean over its own tokens (or questions), averaged over the examples.
    """

    def __init__(self, compressor, prefix_text: str = "", distill_weight: float = 0.0, ae_weight: float = 0.0,
                 teacher=None, distill_tokens: str = "answer", hidden_weight: float = 0.0,
                 divergence: str = "forward", on_policy_tokens: int = 0, temperature: float = 1.0,
                 risk_weight: float = 0.0, risk_samples: int = 4, risk_max_tokens: int = 12,
                 weighting: str = "example"):
        if on_policy_tokens < 0:
            raise InvalidInputError(f"on_policy_tokens must be >= 0 (0 = off), got {on_policy_tokens}")
        if distill_tokens not in DISTILL_TOKENS:
            raise InvalidInputError(f"distill_tokens must be one of {DISTILL_TOKENS}, got {distill_tokens!r}")
        if divergence not in DISTILL_DIVERGENCES:
            raise InvalidInputError(f"divergence must be one of {DISTILL_DIVERGENCES}, got {divergence!r}")
        if not temperature > 0:
            raise InvalidInputError(f"temperature must be > 0 (1 = the plain KL), got {temperature}")
        if risk_weight < 0 or risk_samples < 1 or risk_max_tokens < 1:
            raise InvalidInputError("risk_weight must be >= 0 and risk_samples, risk_max_tokens >= 1, got "
                             f"{risk_weight}, {risk_samples}, {risk_max_tokens}")
        self.compressor = compressor
        self.weighting = _check_weighting(weighting)
        self.distill_weight = distill_weight
        self.hidden_weight = hidden_weight
        self.ae_weight = ae_weight
        self.teacher = teacher
        self.distill_tokens = distill_tokens
        self.divergence = divergence
        self.temperature = temperature
        self.on_policy_tokens = on_policy_tokens
        self.risk_weight, self.risk_samples, self.risk_max_tokens = risk_weight, risk_samples, risk_max_tokens
        self.prefix = _prompt_head(compressor.tokenizer, prefix_text)
        self._prefix_kv = None  # constant K/V of the prefix text under the frozen decoder

    def parameters(self):
        return [p for p in self.compressor.parameters() if p.requires_grad]

    def prefix_kv(self):
        """K/V of the prefix text as the decoder reads it: constant for a frozen decoder (computed
        once), recomputed with gradients when a decoder adapter is being trained."""
        if not self.prefix:
            return None
        comp = self.compressor
        if comp.config.decoder_lora_rank:
            with comp.decoder_mode():
                return _context_kv(comp.base_model, self.prefix, comp.device)
        if self._prefix_kv is None:
            with torch.no_grad(), comp.decoder_mode():
                self._prefix_kv = _context_kv(comp.base_model, self.prefix, comp.device)
        return self._prefix_kv

    def loss(self, examples: list[Example], future_bias: float = 0.0) -> tuple[torch.Tensor, dict]:
        comp = self.compressor
        chunk_len = comp.config.chunk_len
        p = len(self.prefix)
        chunks, offsets, owner = [], [], []
        context_lengths = []
        for i, ex in enumerate(examples):
            position = p
            for passage in ex.passages:
                for start in range(0, len(passage), chunk_len):
                    chunks.append(passage[start : start + chunk_len])
                    offsets.append(position)
                    owner.append(i)
                    position += len(chunks[-1])
            context_lengths.append(position)
        encoded = comp.encode(chunks, offsets, future_bias=future_bias)
        prefix_kv = self.prefix_kv()
        caches = []
        for i in range(len(examples)):
            mine = [kv for kv, o in zip(encoded, owner) if o == i]
            keys = torch.cat(([prefix_kv[0]] if prefix_kv else []) + [kv.keys for kv in mine], dim=2)
            values = torch.cat(([prefix_kv[1]] if prefix_kv else []) + [kv.values for kv in mine], dim=2)
            caches.append((keys, values))

        rows, row_owner, distilled_rows = [], [], []
        for i, ex in enumerate(examples):
            for r, row in enumerate(ex.rows):
                rows.append(row)
                row_owner.append(i)
                distilled_rows.append(r < len(ex.rows) - ex.span_rows)
        distilling = self.distill_weight > 0 or self.hidden_weight > 0
        gold_rows = len(rows)
        if distilling and self.on_policy_tokens:
            own = self._own_answer_rows(caches, context_lengths, rows, row_owner, distilled_rows)
            rows += [row for row, _ in own]
            row_owner += [owner for _, owner in own]
            distilled_rows += [True] * len(own)
        every_token = distilling and self.distill_tokens == "all"
        with comp.decoder_mode():
            student = _decode_rows(comp.base_model, caches, context_lengths, rows, row_owner,
                                   every_token=every_token, layers=self.hidden_weight > 0)
        own_answer = student.row >= gold_rows  # tokens of the on-policy rows: distilled, never CE-trained
        is_target = student.is_target & ~own_answer
        example_of = torch.as_tensor(row_owner, device=student.row.device)[student.row]  # each kept token's example
        ce = self._mean(F.cross_entropy(student.logits[is_target].float(), student.labels[is_target], reduction="none"),
                        example_of[is_target])
        read = sum(len(chunk) for chunk in chunks) + sum(len(prompt) + len(target) for prompt, target in rows)
        loss, stats = ce, {"ce": ce.item(), "target_tokens": int(is_target.sum()), "input_tokens": read}

        if distilling and any(distilled_rows):  # rows of span questions only: nothing to distil
            teacher = self._teacher_rows(examples, context_lengths, rows, row_owner, every_token)
            distilled = torch.as_tensor(distilled_rows, device=student.row.device)[student.row]
            # An on-policy row's question tokens are its gold row's: distilled once, there.
            distilled &= ~own_answer | student.is_target
            stats["distilled_tokens"] = int(distilled.sum())
            if self.on_policy_tokens:
                stats["on_policy_tokens"] = int((distilled & own_answer).sum())
            if self.distill_weight > 0:
                kl = self._mean(_kl(student.logits[distilled], teacher.logits[distilled], self.divergence,
                                    self.temperature), example_of[distilled])
                loss = loss + self.distill_weight * kl
                stats["kl"] = kl.item()
            if self.hidden_weight > 0:
                hidden = self._mean(_hidden_distance(student.layers[:, distilled], teacher.layers[:, distilled]),
                                    example_of[distilled])
                loss = loss + self.hidden_weight * hidden
                stats["hidden"] = hidden.item()

        real = [r for r in range(gold_rows) if distilled_rows[r]]  # not span questions
        if self.risk_weight > 0 and real:
            risk, candidates, sample_f1 = self._expected_risk(caches, context_lengths, rows, row_owner, real)
            loss = loss + self.risk_weight * risk
            stats.update(risk=risk.item(), risk_candidates=candidates, sample_f1=sample_f1)

        if self.ae_weight > 0:
            texts = [[t for passage in ex.passages for t in passage][: chunk_len + 1] for ex in examples]
            ae_rows = [(text[:1], text[1:]) for text in texts]
            with comp.decoder_mode():
                decoded = _decode_rows(comp.base_model, caches, context_lengths, ae_rows, list(range(len(examples))))
            ae = self._mean(F.cross_entropy(decoded.logits.float(), decoded.labels, reduction="none"), decoded.row)
            loss = loss + self.ae_weight * ae
            stats["ae"] = ae.item()
        stats["loss"] = loss.item()
        return loss, stats

    def _mean(self, values: torch.Tensor, examples: torch.Tensor) -> torch.Tensor:
        """``weighted_mean`` with this objective's weighting."""
        return weighted_mean(values, examples, self.weighting)

    def _own_answer_rows(self, caches, context_lengths, rows, row_owner, distilled_rows) -> list[tuple[tuple, int]]:
        """``((prompt, answer), owner)`` for each distilled row whose greedy answer from the
        compressed passages differs from its gold target."""
        comp = self.compressor
        asked = [r for r, distilled in enumerate(distilled_rows) if distilled]
        prompts = [rows[r][0] for r in asked]
        with torch.no_grad(), comp.decoder_mode():
            answers = decode_answers(comp.base_model, caches, context_lengths, prompts, [row_owner[r] for r in asked],
                                     comp.tokenizer.eos_token_id, self.on_policy_tokens)
        return [((prompt, answer), row_owner[r]) for r, prompt, answer in zip(asked, prompts, answers)
                if answer != rows[r][1]]

    def _expected_risk(self, caches, context_lengths, rows, row_owner, asked) -> tuple[torch.Tensor, int, float]:
        """Minimum risk training on rows ``asked``: the expected cost over each row's candidates
        (its gold answer and its distinct sampled ones), the number of candidates, and the mean
        F1 of the samples."""
        comp = self.compressor
        eos, k = comp.tokenizer.eos_token_id, self.risk_samples
        with torch.no_grad(), comp.decoder_mode():
            samples = decode_answers(comp.base_model, caches, context_lengths,
                                     [rows[r][0] for r in asked for _ in range(k)],
                                     [row_owner[r] for r in asked for _ in range(k)], eos, self.risk_max_tokens,
                                     sample=True)
        candidates, owners, groups, costs, sample_f1 = [], [], [], [], []
        for g, r in enumerate(asked):
            prompt, gold = rows[r]
            gold_text = _answer_text(comp.tokenizer, gold)
            drawn = [tuple(answer) for answer in samples[g * k : (g + 1) * k]]
            # agreement, not the official F1: the gold answer costs 0 even where it normalises to nothing (".")
            cost = {answer: 1.0 - answer_agreement(_answer_text(comp.tokenizer, answer), gold_text)
                    for answer in dict.fromkeys([tuple(gold)] + drawn)}  # the distinct candidates, in order
            sample_f1 += [1.0 - cost[answer] for answer in drawn]
            for answer, answer_cost in cost.items():
                candidates.append((prompt, list(answer)))
                owners.append(row_owner[r])
                groups.append(g)
                costs.append(answer_cost)

        def candidate_log_probs() -> torch.Tensor:
            with comp.decoder_mode():
                decoded = _decode_rows(comp.base_model, caches, context_lengths, candidates, owners)
            token_log_probs = -F.cross_entropy(decoded.logits.float(), decoded.labels, reduction="none")
            return torch.zeros(len(candidates), device=token_log_probs.device).index_add(
                0, decoded.row, token_log_probs)

        # Every candidate reads its own copy of its cache: recomputed in the backward pass instead of
        # kept (the same gradients; without it a step with long passages outgrew 24 GB).
        log_probs = torch.utils.checkpoint.checkpoint(candidate_log_probs, use_reentrant=False)
        per_question = expected_risk(log_probs, torch.as_tensor(costs, device=log_probs.device), groups)
        risk = self._mean(per_question, torch.as_tensor([row_owner[r] for r in asked], device=log_probs.device))
        return risk, len(candidates), sum(sample_f1) / len(sample_f1)

    def _teacher_rows(self, examples, context_lengths, rows, row_owner, every_token) -> DecodedRows:
        """The teacher reading the passages as text, decoded at the same rows and positions."""
        comp = self.compressor
        teacher = self.teacher if self.teacher is not None else comp.base_model
        frozen = contextlib.nullcontext() if self.teacher is not None else comp.frozen_mode()
        with torch.no_grad(), frozen:
            teacher_caches = [
                _context_kv(teacher, self.prefix + [t for passage in ex.passages for t in passage], comp.device)
                for ex in examples
            ]
            return _decode_rows(teacher, teacher_caches, context_lengths, rows, row_owner,
                                every_token=every_token, layers=self.hidden_weight > 0)


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: str,
        temperature: float = 1.0) -> torch.Tensor:
    """Per token, KL(teacher || student) ("forward") or KL(student || teacher) ("reverse")
    between the temperature-softened distributions, times temperature^2."""
    student = (student_logits.float() / temperature).log_softmax(-1)
    teacher = (teacher_logits.float() / temperature).log_softmax(-1)
    scale = temperature ** 2
    # F.kl_div(input, target) is KL(target || input), both given as log-probabilities here.
    if divergence == "reverse":
        return scale * F.kl_div(teacher, student, log_target=True, reduction="none").sum(-1)
    return scale * F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)


def _answer_text(tokenizer, answer) -> str:
    return tokenizer.decode([t for t in answer if t != tokenizer.eos_token_id], skip_special_tokens=True).strip()


def expected_risk(log_probs: torch.Tensor, costs: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """For each group, in order of group number, sum_i Q(i) cost(i), Q the softmax of ``log_probs``
    within the group (a group: one question's candidate answers)."""
    index = torch.as_tensor(groups, device=log_probs.device)
    return torch.stack([(log_probs[index == g].softmax(0) * costs[index == g]).sum() for g in sorted(set(groups))])


def _hidden_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per token, the mean over layers and dimensions of the squared distance between RMS-normalised
    hidden states ``[layers, tokens, dim]`` (0 when equal, 4 when opposite; per element)."""
    dim = (student.shape[-1],)
    distance = (F.rms_norm(student.float(), dim) - F.rms_norm(teacher.float(), dim)).pow(2)
    return distance.mean(dim=(0, 2))


def weighted_mean(values: torch.Tensor, examples: torch.Tensor, weighting: str = "example") -> torch.Tensor:
    """The mean of per-token (or per-question) ``values`` whose examples are ``examples`` (indices in
    the micro-batch): over examples, each the mean of its own values (``"example"``; examples without
    values do not count), or over all values at once (``"micro_batch_tokens"``). See LOSS_WEIGHTINGS."""
    if weighting == "micro_batch_tokens":
        return values.mean()
    if not len(values):
        return values.sum() / 0  # NaN, as the mean of no values
    count = int(examples.max()) + 1
    sums = values.new_zeros(count).index_add(0, examples, values)
    counts = torch.bincount(examples, minlength=count)
    held = counts > 0
    return (sums[held] / counts[held]).mean()


def _check_weighting(weighting: str) -> str:
    if weighting not in LOSS_WEIGHTINGS:
        raise InvalidInputError(f"weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    return weighting


class FullTextObjective:
    """Full-FT: a decoder LoRA (``peft_model``) trained on the same examples with the passages
    read as text. The honest upper bound for any compressor on the same data. The answer
    cross-entropy is averaged as ``weighting`` says (LOSS_WEIGHTINGS)."""

    def __init__(self, peft_model, tokenizer, prefix_text: str = "", weighting: str = "example"):
        self.model = peft_model
        self.prefix = _prompt_head(tokenizer, prefix_text)
        self.weighting = _check_weighting(weighting)

    def parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def loss(self, examples: list[Example], future_bias: float = 0.0) -> tuple[torch.Tensor, dict]:
        device = self.model.get_input_embeddings().weight.device
        sequences, owners = [], []
        for i, ex in enumerate(examples):
            context = self.prefix + [t for passage in ex.passages for t in passage]
            for prompt, target in ex.rows:
                sequences.append((context + prompt, target))
                owners.append(i)
        ids, mask, labels, is_target = _pad_rows(sequences)
        hidden = self.model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        labels, keep = labels.to(device), is_target.to(device)
        example_of = torch.as_tensor(owners, device=device)[:, None].expand(keep.shape)[keep]
        per_token = F.cross_entropy(self.model.get_output_embeddings()(hidden[keep]).float(), labels[keep],
                                    reduction="none")
        loss = weighted_mean(per_token, example_of, self.weighting)
        return loss, {"ce": loss.item(), "loss": loss.item(), "target_tokens": int(keep.sum()),
                      "input_tokens": int(mask.sum())}


def _pad_rows(rows: list[tuple[list[int], list[int]]]):
    """Right-padded ``(ids, mask, labels, is_target)`` for (prompt, target) rows. ``labels`` holds
    the next token at every position that has one; ``is_target`` marks the positions whose next
    token is a target (the first target token is predicted from the last prompt token)."""
    width = max(len(prompt) + len(target) for prompt, target in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    is_target = torch.zeros(len(rows), width, dtype=torch.bool)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (prompt, target) in enumerate(rows):
        if not prompt:
            raise InvalidInputError("every decoder row needs at least one prompt token to predict from")
        seq = prompt + target
        ids[r, : len(seq)] = torch.as_tensor(seq)
        mask[r, : len(seq)] = 1
        labels[r, : len(seq) - 1] = torch.as_tensor(seq[1:])
        is_target[r, len(prompt) - 1 : len(seq) - 1] = True
    return ids, mask, labels, is_target


def _prompt_head(tokenizer, prefix_text: str) -> list[int]:
    """The tokens every training prompt starts with: the BOS token where the tokenizer starts texts
    with one (as the generator that answers does), then ``prefix_text``."""
    return bos_ids(tokenizer) + (tokenizer(prefix_text, add_special_tokens=False)["input_ids"] if prefix_text else [])


def _context_kv(model, ids: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V ``[layers, heads, len, dim]`` of a text read by ``model`` at positions 0..len-1."""
    out = model(input_ids=torch.as_tensor([ids], device=device), use_cache=True, logits_to_keep=1)
    layers = out.cache.layers
    kept = min(lay.keys.shape[2] for lay in layers)
    if kept < len(ids):  # a sliding-window layer keeps only its window's last tokens
        raise InvalidInputError(
            f"a text of {len(ids)} tokens is read here as one cache, but the model's sliding-window layers keep "
            f"only the last {kept} tokens of it: shorten it (for the prompt's opening: PromptTemplate.prefix and "
            f"context_prefix) to at most {kept} tokens")
    return torch.stack([lay.keys[0] for lay in layers]), torch.stack([lay.values[0] for lay in layers])


@dataclass
class DecodedRows:
    """What ``_decode_rows`` keeps, at the kept positions only: logits ``[kept, vocab]``, their
    next-token labels, which of them are targets, the row each came from, and (if asked) every
    decoder layer's output ``[layers, kept, dim]``."""

    logits: torch.Tensor
    labels: torch.Tensor
    is_target: torch.Tensor
    row: torch.Tensor
    layers: torch.Tensor | None = None


def decode_answers(model, caches, context_lengths, prompts, row_owner, eos: int, max_tokens: int,
                   sample: bool = False, generator: torch.Generator | None = None) -> list[list[int]]:
    """Answer (ending in ``eos``, or cut at ``max_tokens``) to each prompt, read after its cache
    ``caches[row_owner[r]]`` as ``_decode_rows`` lays it out: greedy, or with ``sample`` drawn
    from the full distribution (temperature 1; torch's global RNG unless ``generator``). Call
    without gradients. The prompts are read once and each answer token is appended to the rows'
    cache, as generation does."""
    inputs = _row_inputs(model, caches, context_lengths, [(prompt, []) for prompt in prompts], row_owner)
    device = inputs.ids.device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    every = torch.arange(len(prompts), device=device)
    last = torch.as_tensor([len(prompt) - 1 for prompt in prompts], device=device)
    out = decoder(input_ids=inputs.ids, position_ids=inputs.positions, attention_mask=inputs.mask,
                  cache=inputs.cache, use_cache=True)
    hidden, position, mask = out.last_hidden_state[every, last], inputs.positions[every, last], inputs.mask
    choice = GenerationConfig(temperature=1.0 if sample else 0.0)
    answers: list[list[int]] = [[] for _ in prompts]
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(max_tokens):
        logits = head(hidden)
        tokens = next_tokens(logits, choice, generator)
        chosen = tokens.tolist()  # one copy from the device per step, not one per row
        for r in (~finished).nonzero()[:, 0].tolist():
            answers[r].append(chosen[r])
        finished |= tokens == eos
        if bool(finished.all()) or step == max_tokens - 1:
            break
        position = position + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = decoder(input_ids=tokens[:, None], position_ids=position[:, None], attention_mask=mask,
                      cache=inputs.cache, use_cache=True)
        hidden = out.last_hidden_state[:, -1]
    return answers


@dataclass
class _RowInputs:
    """Decoder inputs for rows that each read a cache, then their own tokens (see ``_row_inputs``)."""

    cache: object  # transformers DynamicCache: each row's cache, left-padded to a common length
    ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor  # [rows, cache + text]: pads of either part masked
    labels: torch.Tensor
    is_target: torch.Tensor


def _row_inputs(model, caches, context_lengths, rows, row_owner) -> _RowInputs:
    """Row r reads cache ``caches[row_owner[r]]`` (left-padded to a common length, pads masked),
    then its prompt + target tokens at positions continuing from its context length."""
    from transformers import DynamicCache

    device = caches[0][0].device
    width_cache = max(k.shape[2] for k, _ in caches)
    ids, text_mask, labels, is_target = _pad_rows(rows)
    cache_mask = torch.zeros(len(rows), width_cache, dtype=torch.long)
    index = torch.as_tensor(row_owner, device=device)
    padded_k, padded_v = [], []
    for keys, values in caches:
        pad = width_cache - keys.shape[2]
        padded_k.append(F.pad(keys, (0, 0, pad, 0)))
        padded_v.append(F.pad(values, (0, 0, pad, 0)))
    for r, o in enumerate(row_owner):
        cache_mask[r, width_cache - caches[o][0].shape[2]:] = 1
    all_k = torch.stack(padded_k).index_select(0, index)  # [rows, layers, heads, C, dim]
    all_v = torch.stack(padded_v).index_select(0, index)
    cache = DynamicCache(
        ddp_cache_data=[(all_k[:, layer], all_v[:, layer]) for layer in range(all_k.shape[1])],
        config=model.config,
    )
    starts = torch.as_tensor([context_lengths[o] for o in row_owner])
    positions = starts[:, None] + torch.arange(ids.shape[1])[None]
    return _RowInputs(cache=cache, ids=ids.to(device), positions=positions.to(device),
                      mask=torch.cat([cache_mask, text_mask], dim=1).to(device),
                      labels=labels.to(device), is_target=is_target.to(device))


def _decode_rows(model, caches, context_lengths, rows, row_owner, every_token: bool = False,
                 layers: bool = False) -> DecodedRows:
    """Decoder pass over many rows at once, laid out by ``_row_inputs``. Kept are the target
    positions, or every position with a next token when ``every_token``; ``layers`` also returns
    the decoder layers' outputs there."""
    inputs = _row_inputs(model, caches, context_lengths, rows, row_owner)
    out = model.get_decoder()(
        input_ids=inputs.ids,
        position_ids=inputs.positions,
        attention_mask=inputs.mask,
        cache=inputs.cache,
        use_cache=True,
        output_hidden_states=layers,
    )
    keep = (inputs.labels != IGNORE) if every_token else inputs.is_target
    # The LM head (vocab-sized) only where it is needed: most of a step's cost otherwise.
    return DecodedRows(
        logits=model.get_output_embeddings()(out.last_hidden_state[keep]),
        labels=inputs.labels[keep],
        is_target=inputs.is_target[keep],
        row=torch.arange(len(rows), device=keep.device)[:, None].expand(keep.shape)[keep],
        # hidden_states[0] is the embedding of the same tokens in both models: not compared
        layers=torch.stack([h[keep] for h in out.hidden_states[1:]]) if layers else None,
    )
