"""SQuAD v1.1 and v2.0 extractive QA: loading, windows of tokens for the model, and answers back from its logits.

`load_squad(...)` reads the official SQuAD JSON (``{"data": [{"title", "paragraphs": [{"context",
"qas": [{"id", "question", "answers": [{"text", "answer_start"}]}]}]}], "version": "1.1"}``), or a
flat json/jsonl file with one question per row in the HF ``squad`` schema, or a hub dataset. Every
split comes out as the HF ``squad`` columns: ``id, title, context, question, answers{text,
answer_start}``. Inputs a user can get wrong (an answer that is not at its ``answer_start``, a
question without answers, a repeated id) stop with a `SquadDataError` that names the file and the id.

SQuAD v2.0 adds unanswerable questions. They are read only with ``version_2_with_negative=True``
(`is_squad_v2_file` tells whether an official-layout file is one: ``"version": "v2.0"``, or a
question marked ``"is_impossible": true``). In the official layout an unanswerable question is marked
``"is_impossible": true`` and has ``"answers": []`` (its ``plausible_answers`` are not read); a
question with no answers that is not so marked is an error in v2.0 as in v1.1. In flat rows and hub
datasets (HF ``squad_v2``), an empty ``answers`` list is what makes a question unanswerable. Either way
it comes out with empty ``answers`` (the HF ``squad_v2`` convention).

A context longer than the model's window is cut into overlapping windows (``max_length`` tokens,
``stride`` tokens of overlap), each one a *feature*:

* `train_features`: the start/end token of the first gold answer in each window, or the window's
  [CLS] token (index 0) when the answer is not wholly inside it, and in every window of an
  unanswerable question; the standard BERT SQuAD labelling.
* `eval_features`: which question each window belongs to, and each token's character span in the
  context (None outside the context), so `best_answers` can turn logits back into context text.

`best_answers` scores every span (start, end) among each window's ``n_best`` highest start and end
logits by start + end logit, keeps spans inside the context, with start <= end and at most
``max_answer_length`` tokens, and returns the best-scoring span over all windows of a question. For
SQuAD v2.0 (``version_2_with_negative``) it also takes the question's null score, the lowest
[CLS] start + end logit over its windows, and answers "" (no answer) when the null score exceeds the
best span's score by more than ``null_score_diff_threshold``, as HF transformers' utils_qa.py does.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import datasets

SQUAD_FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "title": datasets.Value("string"),
    "context": datasets.Value("string"),
    "question": datasets.Value("string"),
    "answers": datasets.Sequence({"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}),
})


class SquadDataError(ValueError):
    """SQuAD input that cannot be used as given; the message says what is wrong and where."""


# -- loading --------------------------------------------------------------------------------------------
_V2_HINT = ("SQuAD v2.0 data: mark unanswerable questions \"is_impossible\": true in the official layout, "
            "or pass --version_2_with_negative")


def _read_json(path: Path):
    if not path.is_file():
        raise SquadDataError(f"SQuAD file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SquadDataError(f"{path}: not valid JSON ({err})") from None


def _v2_marker(data) -> str | None:
    """What makes an official-layout file SQuAD v2.0 (its version, or an is_impossible question), or None."""
    if not (isinstance(data, dict) and "data" in data):
        return None
    if str(data.get("version", "1.1")).lstrip("v").startswith("2"):  # the official v2 files say "v2.0"
        return f"its version is {data['version']!r}"
    try:
        for article in data["data"]:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    if qa.get("is_impossible") is True:
                        return f"question {qa.get('id')!r} is marked is_impossible"
    except (KeyError, TypeError, AttributeError):  # not the layout: read_squad_file says so
        return None
    return None


def is_squad_v2_file(path: str | Path) -> bool:
    """An official-layout SQuAD file that is v2.0: ``"version": "v2.0"`` (or "2.0"), or a question marked
    ``"is_impossible": true``. Flat rows carry no such mark (False); an unreadable file is False too,
    and `read_squad_file` reports it."""
    try:
        return _v2_marker(_read_json(Path(path))) is not None
    except SquadDataError:
        return False


def read_squad_file(path: str | Path, version_2_with_negative: bool = False) -> list[dict]:
    """One row per question from an official SQuAD JSON file, or a flat json/jsonl file of rows.

    ``version_2_with_negative``: SQuAD v2.0, unanswerable questions allowed (they come out with empty
    answers); without it a v2.0 file is an error."""
    path = Path(path)
    data = _read_json(path)
    if isinstance(data, dict) and "data" in data:  # the official nested layout
        marker = _v2_marker(data)
        if marker and not version_2_with_negative:
            raise SquadDataError(f"{path}: a SQuAD v2.0 file with unanswerable questions ({marker}): read it with "
                                 "version_2_with_negative (recipes/squad.py: --version_2_with_negative)")
        try:
            rows = [dict(id=qa["id"], title=article.get("title", ""), context=paragraph["context"],
                         question=qa["question"],
                         answers=dict(text=[a["text"] for a in qa["answers"]],
                                      answer_start=[a["answer_start"] for a in qa["answers"]]))
                    for article in data["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
        except (KeyError, TypeError) as err:
            raise SquadDataError(f"{path}: not in the SQuAD layout data[].paragraphs[].qas[] (missing {err})") from None
        if version_2_with_negative:  # the answers must agree with the is_impossible marks
            _check_impossible_marks(data, path)
    elif isinstance(data, list):  # flat rows, as the HF squad dataset stores them
        missing = [k for k in SQUAD_FEATURES if data and k not in data[0] and k != "title"]
        if missing or not data:
            raise SquadDataError(f"{path}: flat rows need the fields id, context, question, answers "
                                 f"(missing: {', '.join(missing) or 'every row, the file is empty'})")
        # other fields (e.g. is_impossible, plausible_answers of a converted v2.0 file) are not read
        rows = [{k: row.get(k, "") if k == "title" else row[k] for k in SQUAD_FEATURES} for row in data]
    else:
        raise SquadDataError(f"{path}: expected the SQuAD layout {{'data': [...]}} or a list of rows")
    check_rows(rows, str(path), version_2_with_negative)
    return rows


def _check_impossible_marks(data: dict, path: Path) -> None:
    """SQuAD v2.0 official layout: a question has no answers if and only if it is marked is_impossible."""
    for qa in (qa for article in data["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]):
        impossible = qa.get("is_impossible") is True
        if impossible and qa["answers"]:
            raise SquadDataError(f"{path}: question {qa['id']!r} is marked is_impossible but has answers "
                                 "(SQuAD v2.0 keeps an unanswerable question's candidates in plausible_answers)")
        if not impossible and not qa["answers"]:
            raise SquadDataError(f"{path}: question {qa['id']!r} has no answer and is not marked "
                                 "\"is_impossible\": true (in SQuAD v2.0 an unanswerable question must be)")


def check_rows(rows: list[dict], where: str, version_2_with_negative: bool = False) -> None:
    """Every question has an answer (or, in SQuAD v2.0, none: unanswerable), found at its answer_start;
    ids are unique."""
    if not rows:
        raise SquadDataError(f"{where}: no questions")
    seen = set()
    for row in rows:
        qid, answers = row["id"], row["answers"]
        if qid in seen:
            raise SquadDataError(f"{where}: question id {qid!r} appears twice")
        seen.add(qid)
        if not answers["text"] and not version_2_with_negative:
            raise SquadDataError(f"{where}: question {qid!r} has no answer: every SQuAD v1.1 question needs one "
                                 f"({_V2_HINT})")
        for text, start in zip(answers["text"], answers["answer_start"]):
            if row["context"][start:start + len(text)] != text:
                raise SquadDataError(f"{where}: question {qid!r}: answer {text!r} is not at answer_start {start} "
                                     f"of its context (found {row['context'][start:start + len(text)]!r})")


def load_squad(train_file: str | None = None, validation_file: str | None = None,
               hub_name: str | None = None, version_2_with_negative: bool = False) -> datasets.DatasetDict:
    """The "train" and/or "validation" splits from files or from ``datasets.load_dataset(hub_name)``.

    ``version_2_with_negative``: SQuAD v2.0, questions without answers are unanswerable (not errors)."""
    if hub_name:
        try:
            raw = datasets.load_dataset(hub_name)
        except (ConnectionError, FileNotFoundError) as err:  # offline, or no such dataset
            raise SquadDataError(f"could not load {hub_name!r} from the hub ({err}); without hub access pass "
                                 "--train_file and --validation_file") from None
        for split in raw:
            check_rows(raw[split].to_list(), f"{hub_name}[{split}]", version_2_with_negative)
        return raw
    splits = {split: datasets.Dataset.from_list(read_squad_file(f, version_2_with_negative), features=SQUAD_FEATURES)
              for split, f in (("train", train_file), ("validation", validation_file)) if f}
    return datasets.DatasetDict(splits)


# -- windows of tokens ------------------------------------------------------------------------------------
def check_tokenizer(model_path: str, max_length: int, stride: int, trust_remote_code: bool = False) -> None:
    """Before training: the model's tokenizer can cut windows of this size (raises SquadDataError)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    _require_fast(tokenizer)
    # model_max_length is a huge sentinel when the tokenizer does not know its model's limit
    if max_length > tokenizer.model_max_length:
        raise SquadDataError(f"--max_seq_length {max_length} is longer than the model's {tokenizer.model_max_length} "
                             "positions: lower it (windows of 384 with a stride of 128 are the usual choice)")
    question_room(tokenizer, max_length, stride, 1)


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise SquadDataError(f"{type(tokenizer).__name__} is not a fast tokenizer: SQuAD windows need the "
                             "character offsets that only fast (Rust) tokenizers return")


def question_room(tokenizer, max_length: int, stride: int, max_question_length: int) -> int:
    """Question tokens a window can hold: at most ``max_question_length``, and few enough that the
    context keeps more than ``stride`` tokens (the tokenizer aborts the process otherwise)."""
    room = min(max_question_length, max_length - tokenizer.num_special_tokens_to_add(pair=True) - stride - 1)
    if room < 1:
        raise SquadDataError(f"a window of {max_length} tokens with a stride of {stride} leaves no room for the "
                             "question: lower --doc_stride or raise --max_seq_length")
    return room


def _tokenize(examples: dict, tokenizer, max_length: int, stride: int, max_question_length: int,
              padding) -> tuple[dict, int]:
    """Question and context as a pair, the context cut into overlapping windows.

    Returns the encoding and the sequence index (0 or 1) the context has in it."""
    _require_fast(tokenizer)
    # Left-padding models (e.g. XLNet) put the context first, so truncation cuts the context either way.
    question_first = tokenizer.padding_side == "right"
    # Leading spaces in some questions would only waste window length.
    questions = [q.lstrip() for q in examples["question"]]
    # Over-long questions are cut to their first `room` tokens, as BERT's run_squad.py did (max_query_length).
    room = question_room(tokenizer, max_length, stride, max_question_length)
    q_offsets = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    questions = [q[:offsets[room - 1][1]] if len(offsets) > room else q for q, offsets in zip(questions, q_offsets)]
    first, second = (questions, examples["context"]) if question_first else (examples["context"], questions)
    encoding = tokenizer(first, second, truncation="only_second" if question_first else "only_first",
                         max_length=max_length, stride=stride, return_overflowing_tokens=True,
                         return_offsets_mapping=True, padding=padding)
    return encoding, 1 if question_first else 0


def train_features(examples: dict, tokenizer, *, max_length: int, stride: int, max_question_length: int = 64,
                   padding=False) -> dict:
    """A `datasets.map(batched=True)` function: windows with start/end token labels of the first answer
    ([CLS], index 0, in a window without the whole answer and in every window of an unanswerable question)."""
    enc, context_seq = _tokenize(examples, tokenizer, max_length, stride, max_question_length, padding)
    starts, ends = [], []
    for i, offsets in enumerate(enc["offset_mapping"]):
        answers = examples["answers"][enc["overflow_to_sample_mapping"][i]]
        if not answers["text"]:  # SQuAD v2.0: unanswerable, so every window points at [CLS]
            starts.append(0)
            ends.append(0)
            continue
        char_start = answers["answer_start"][0]
        char_end = char_start + len(answers["text"][0])
        seq_ids = enc.sequence_ids(i)
        ctx = [t for t, s in enumerate(seq_ids) if s == context_seq]
        first, last = ctx[0], ctx[-1]
        if offsets[first][0] > char_start or offsets[last][1] < char_end:
            starts.append(0)  # the answer is not wholly in this window: point at [CLS]
            ends.append(0)
            continue
        start = first
        while start <= last and offsets[start][0] <= char_start:
            start += 1
        end = last
        while end >= first and offsets[end][1] >= char_end:
            end -= 1
        starts.append(start - 1)  # the last token starting at or before the answer
        ends.append(end + 1)  # the first token ending at or after it
    enc["start_positions"], enc["end_positions"] = starts, ends
    enc.pop("offset_mapping")
    enc.pop("overflow_to_sample_mapping")
    return enc


def eval_features(examples: dict, tokenizer, *, max_length: int, stride: int, max_question_length: int = 64,
                  padding=False, indices: list[int] | None = None) -> dict:
    """A `datasets.map(batched=True, with_indices=True)` function: windows, the row index of their
    question (``example_index``) and the character span of each context token (None elsewhere)."""
    enc, context_seq = _tokenize(examples, tokenizer, max_length, stride, max_question_length, padding)
    rows = indices if indices is not None else range(len(examples["question"]))
    enc["example_index"] = [rows[i] for i in enc.pop("overflow_to_sample_mapping")]
    enc["offset_mapping"] = [[o if s == context_seq else None for o, s in zip(offsets, enc.sequence_ids(i))]
                             for i, offsets in enumerate(enc["offset_mapping"])]
    return enc


# -- answers back from logits --------------------------------------------------------------------------------
def best_answers(examples: datasets.Dataset, features: datasets.Dataset, start_logits: list[np.ndarray],
                 end_logits: list[np.ndarray], *, n_best: int = 20, max_answer_length: int = 30,
                 version_2_with_negative: bool = False, null_score_diff_threshold: float = 0.0) -> dict[str, str]:
    """{question id: answer text} from the logits of every feature (``start_logits[f]`` belongs to
    ``features[f]``; each may be longer than the feature, e.g. padded, never shorter).

    A question none of whose windows holds a valid span gets the empty answer. With
    ``version_2_with_negative`` (SQuAD v2.0) a question's null score is the lowest start + end logit of
    [CLS] (token 0) over its windows, and the answer is "" when null score - best span score >
    ``null_score_diff_threshold`` (HF transformers' postprocess_qa_predictions)."""
    contexts, ids = examples["context"], examples["id"]
    best: dict[int, tuple[float, str]] = {}
    null: dict[int, float] = {}
    for f, (example, offsets) in enumerate(zip(features["example_index"], features["offset_mapping"])):
        n = len(offsets)
        start, end = np.asarray(start_logits[f][:n]), np.asarray(end_logits[f][:n])
        if version_2_with_negative:
            # the window least sure there is no answer decides: one window that holds the answer is enough
            null[example] = min(null.get(example, np.inf), float(start[0] + end[0]))
        # argsort is stable, so among equal logits the earlier token wins, on every run
        top_starts = np.argsort(-start, kind="stable")[:n_best]
        top_ends = np.argsort(-end, kind="stable")[:n_best]
        for s in top_starts:
            if offsets[s] is None:
                continue
            for e in top_ends:
                if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                    continue
                score = float(start[s] + end[e])
                if example not in best or score > best[example][0]:
                    best[example] = (score, contexts[example][offsets[s][0]:offsets[e][1]])
    if version_2_with_negative:
        return {qid: best[i][1] if i in best and null[i] - best[i][0] <= null_score_diff_threshold else ""
                for i, qid in enumerate(ids)}
    return {qid: best[i][1] if i in best else "" for i, qid in enumerate(ids)}
