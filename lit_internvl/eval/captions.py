"""Captioning scores as COCO's caption evaluation computes them: CIDEr-D and BLEU-1…4 over a corpus of generated
captions, each image with one or more reference captions, after PTB-style tokenisation.

The reference is ``pycocoevalcap`` (the COCO caption evaluation code that InternVL's
``internvl_chat/eval/caption/evaluate_caption.py`` runs through ``COCOEvalCap``), cited by file and line: its
CIDEr scorer (``cider/cider_scorer.py``) and BLEU scorer (``bleu/bleu_scorer.py``) are re-written here, and its
tokenizer (Stanford's Java ``PTBTokenizer``, ``tokenizer/ptbtokenizer.py``) is approximated in Python
(:func:`ptb_tokenize`), so that nothing here needs Java. Both scores are corpus scores: CIDEr-D's n-gram weights
are inverse document frequencies over the references of the images scored together, and BLEU pools the n-gram
counts of every caption, so a score depends on the whole set (score a benchmark's test split at once).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

# tokenizer/ptbtokenizer.py L21-22: the tokens COCO's evaluation drops after tokenising. The Java tokenizer runs
# with -lowerCase, which lower-cases its bracket escapes too ("-lrb-"), so the upper-case entries never match and a
# parenthesis stays in the scored text as "-lrb-"/"-rrb-": kept so here.
PUNCTUATION_TOKENS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CONTRACTION = re.compile(r"(?i)(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
# Marks that PTB always makes tokens of their own (a colon only when not between digits, as in "10:30").
_SPLIT = re.compile(r"(\.\.\.|--|[,;!?&()\[\]{}\"]|:(?!\d)|(?<!\d):)")


def ptb_tokenize(caption: str) -> str:
    """``caption`` as COCO's evaluation scores it: Stanford PTBTokenizer's tokens (``-preserveLines -lowerCase``),
    space-joined, less :data:`PUNCTUATION_TOKENS` (ptbtokenizer.py L27-69).

    A Python approximation of the Java tokenizer's rules that matter to the scores: lower-case; punctuation split
    from words (periods and hyphens inside a token kept: ``3.5-inch``, ``u.s.``; a sentence's final period split
    unless it ends such an abbreviation); contractions split (``aren't`` → ``are n't``, ``cat's`` → ``cat 's``,
    ``kids'`` → ``kids '``); quotes dropped, brackets ``-lrb-``… . It differs
    from Java on abbreviations without an inner period (``mr.`` loses its period here).
    """
    text = caption.replace("\n", " ").lower()
    text = _CONTRACTION.sub(r"\1 \2", text)
    text = re.sub(r"(\w)'(\s|$)", r"\1 '\2", text)  # a plural possessive: kids' → kids '
    text = _SPLIT.sub(r" \1 ", text)
    tokens = []
    for token in text.split():
        if token in _BRACKETS:
            tokens.append(_BRACKETS[token])
        elif token == '"':
            continue  # an opening `` or closing '' in PTB: dropped either way
        elif token.endswith(".") and token != "..." and "." not in token[:-1]:
            tokens += [token[:-1], "."] if len(token) > 1 else ["."]  # "beach." → beach .; "u.s." stays whole
        else:
            # a quoting apostrophe ('fetch') is PTB's ` token, dropped; a contraction ('s) is a token of its own
            tokens.append(token[1:] if token.startswith("'") and not _CONTRACTION.match("x" + token) else token)
    return " ".join(token for token in tokens if token and token not in PUNCTUATION_TOKENS)


def _ngrams(caption: str, n: int = 4) -> Counter:
    """Counts of every 1…``n``-gram of the space-split ``caption`` (cider_scorer.py / bleu_scorer.py ``precook``)."""
    words = caption.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _check(candidates: Mapping, references: Mapping) -> list:
    if set(candidates) != set(references):
        missing, extra = set(references) - set(candidates), set(candidates) - set(references)
        raise ValueError(
            f"captions and references name different images: {len(missing)} without a caption "
            f"{sorted(map(str, missing))[:3]}, {len(extra)} without references {sorted(map(str, extra))[:3]}"
        )
    empty = [key for key, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"{len(empty)} image(s) have no reference caption: {sorted(map(str, empty))[:3]}")
    return list(references)


def cider_d(
    candidates: Mapping[str, str], references: Mapping[str, Sequence[str]], n: int = 4, sigma: float = 6.0
) -> tuple[float, dict[str, float]]:
    """CIDEr-D (Vedantam et al. 2015, as ``pycocoevalcap/cider/cider_scorer.py`` computes it) of tokenised captions:
    ``(corpus score, {image: score})``, the corpus score the images' mean.

    For each image and each n ≤ ``n``: TF-IDF vectors of n-grams, the IDF ``log(images) − log(max(1, df))`` with df the
    number of images whose references hold the n-gram (L100-103, L120-124); the similarity to each reference the
    candidate's weights clipped by the reference's, dotted with the reference's and divided by both norms (L149-154),
    times the length penalty ``exp(−(len_c − len_r)² / 2σ²)`` (L158); the mean over n, over references, × 10
    (L173-178).
    """
    keys = _check(candidates, references)
    refs = {key: [_ngrams(ref, n) for ref in references[key]] for key in keys}
    document_frequency: Counter = Counter()
    for key in keys:
        document_frequency.update({gram for counts in refs[key] for gram in counts})
    log_images = math.log(len(keys))

    def weights(counts: Counter) -> tuple[list[dict], list[float], int]:
        vector: list[dict] = [{} for _ in range(n)]
        for gram, term_frequency in counts.items():
            vector[len(gram) - 1][gram] = term_frequency * (log_images - math.log(max(1.0, document_frequency[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vector]
        # L128-129: the length is the bigram count (``n == 1`` on the 0-based order), a quirk kept: it is the
        # number of words less one for any caption of two words or more, for candidate and reference alike.
        return vector, norms, sum(counts[g] for g in counts if len(g) == 2)

    scores = {}
    for key in keys:
        vec, norm, length = weights(_ngrams(candidates[key], n))
        total = 0.0
        for ref_counts in refs[key]:
            vec_ref, norm_ref, length_ref = weights(ref_counts)
            penalty = math.exp(-((length - length_ref) ** 2) / (2 * sigma**2))
            for order in range(n):
                dot = sum(
                    min(w, vec_ref[order].get(g, 0.0)) * vec_ref[order].get(g, 0.0) for g, w in vec[order].items()
                )
                if norm[order] and norm_ref[order]:
                    dot /= norm[order] * norm_ref[order]
                total += dot * penalty
        scores[key] = total / n / len(refs[key]) * 10.0
    return sum(scores.values()) / len(scores), scores


def bleu(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1…``n`` (Papineni et al. 2002) as ``pycocoevalcap/bleu/bleu_scorer.py`` computes it with
    ``option='closest'`` (bleu.py L40): clipped n-gram matches and candidate n-grams summed over the corpus, the
    geometric mean of their ratios up to each order (with the scorer's 1e-15 / 1e-9 guards against zero, L201-202,
    L249-253), and the brevity penalty ``exp(1 − r/c)`` when the candidates are shorter than the references, r summing
    each image's reference length closest to its candidate's (shorter on a tie, L72, L189).
    """
    keys = _check(candidates, references)
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * n, [0] * n
    test_length = reference_length = 0
    for key in keys:
        words = candidates[key].split()
        counts = _ngrams(candidates[key], n)
        max_counts: Counter = Counter()
        lengths = []
        for ref in references[key]:
            lengths.append(len(ref.split()))
            for gram, count in _ngrams(ref, n).items():
                max_counts[gram] = max(max_counts[gram], count)
        test_length += len(words)
        reference_length += min(lengths, key=lambda length: (abs(length - len(words)), length))
        for gram, count in counts.items():
            correct[len(gram) - 1] += min(max_counts[gram], count)
        for k in range(n):
            guess[k] += max(0, len(words) - k)
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_length + tiny) / (reference_length + small)
    if ratio < 1:
        scores = [score * math.exp(1 - 1 / ratio) for score in scores]
    return scores


def caption_scores(records: Sequence[dict], tokenize: bool = True) -> dict:
    """CIDEr-D and BLEU-1…4 of ``predict``'s records (``{"name", "answer", "reference"}``, the reference one caption
    or a list), each record one image: ``{"metric": "caption", "overall": {"CIDEr", "BLEU-1", …, "count", "chance"}}``,
    the chance level the scores of the same captions given to the wrong images. The captions are tokenised with
    :func:`ptb_tokenize` first (``tokenize=False``: already tokenised)."""
    prepare = ptb_tokenize if tokenize else (lambda text: text)
    candidates, references = {}, {}
    for index, record in enumerate(records):
        key = str(record.get("name", index))
        if key in candidates:
            key = f"{key}#{index}"  # two records of one name are two images
        reference = record.get("reference")
        if reference is None:
            raise ValueError(f"record {key!r} has no reference caption to score against")
        references[key] = [prepare(r) for r in (reference if isinstance(reference, (list, tuple)) else [reference])]
        candidates[key] = prepare(record["answer"])

    def scores(captions: dict) -> dict:
        cider, _ = cider_d(captions, references)
        return {"CIDEr": cider, **{f"BLEU-{k + 1}": s for k, s in enumerate(bleu(captions, references))}}

    # Chance: the same captions on the wrong images (each image given the next one's caption), what captions that
    # ignore their image would score against these references.
    keys = list(candidates)
    shuffled = {key: candidates[keys[(i + 1) % len(keys)]] for i, key in enumerate(keys)}
    chance = scores(shuffled) if len(keys) > 1 else {}
    return {"metric": "caption", "overall": {**scores(candidates), "count": len(candidates), "chance": chance}}
