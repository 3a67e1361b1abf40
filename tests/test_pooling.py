"""adaptopt.pooling: the masked mean the classifier reads, its config round trip, and its refusals."""
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

from adaptopt.pooling import MaskedMeanPooler, apply_classifier_pooling


def classifier(path, pooling):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    return apply_classifier_pooling(model, pooling).eval()


def test_the_classifier_reads_the_masked_mean_of_the_last_hidden_states(tiny_bert):
    model = classifier(tiny_bert, "mean")
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    batch = tokenizer(["a short one", "a much longer sentence with many more tokens in it"], padding=True,
                      return_tensors="pt")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # the first row is padded
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    hidden, mask = out.hidden_states[-1].double(), batch["attention_mask"].double().unsqueeze(-1)
    expected_pooled = (hidden * mask).sum(1) / mask.sum(1)  # written from the definition, in float64
    expected = model.classifier(expected_pooled.float())
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-6)
    # and padding does not change an example's logits: the short sentence alone gives the same
    alone = tokenizer(["a short one"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**alone).logits[0], out.logits[0], rtol=1e-4, atol=1e-5)


def test_mean_pooling_drops_the_pooler_and_survives_save_and_load(tiny_bert, tmp_path):
    cls_model, mean_model = classifier(tiny_bert, None), classifier(tiny_bert, "mean")
    assert type(cls_model.bert.pooler).__name__ == "BertPooler"  # nothing asked: transformers' [CLS] pooler
    assert isinstance(mean_model.bert.pooler, MaskedMeanPooler)
    assert not any("pooler" in name for name, _ in mean_model.named_parameters())
    mean_model.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = classifier(tmp_path, None)  # the config's classifier_pooling: mean, applied again
    assert reloaded.config.classifier_pooling == "mean" and isinstance(reloaded.bert.pooler, MaskedMeanPooler)
    ids = torch.tensor([[101, 2023, 2003, 102, 0]])
    kwargs = dict(input_ids=ids, attention_mask=(ids != 0).long())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**kwargs).logits, mean_model(**kwargs).logits)
    overridden = classifier(tmp_path, "cls")  # asked for explicitly: the [CLS] pooler, and the config follows
    assert type(overridden.bert.pooler).__name__ == "BertPooler" and overridden.config.classifier_pooling == "cls"


def test_unknown_pooling_and_models_without_a_sequence_pooler_are_refused(tiny_bert):
    with pytest.raises(ValueError, match="'max' is not one of cls, mean"):
        classifier(tiny_bert, "max")
    gpt2 = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50, num_labels=2))
    with pytest.raises(ValueError, match="Use --classifier_pooling cls"):
        apply_classifier_pooling(gpt2, "mean")
    assert apply_classifier_pooling(gpt2, "cls") is gpt2
