"""The tiny base's in-context copying pretraining (safemed_lib.pretrain)."""
import pytest
import torch

from safemed_lib import models, pretrain

CORPUS = ["Which imaging modality is shown? A)CT scan, B)MRI, C)X-ray", "The image shows a bright ring."]


def test_copy_batch_repeats_each_row_and_skips_special_tokens():
    ids = pretrain.copy_batch(100, 4, 7, torch.Generator().manual_seed(0), low=16)
    assert ids.shape == (4, 14) and torch.equal(ids[:, :7], ids[:, 7:])
    assert int(ids.min()) >= 16 and int(ids.max()) < 100
    with pytest.raises(ValueError, match="low=99"):
        pretrain.copy_batch(100, 1, 3, torch.Generator(), low=99)


def test_copy_pretraining_teaches_copying_and_is_deterministic():
    def run():
        vlm = models.build_tiny_vlm(CORPUS, seed=0, hidden_size=64, image_size=56, vocab_size=400)
        return vlm, pretrain.copy_pretrain(vlm, 200, seed=3)

    vlm, log = run()
    assert log[0]["step"] == 50 and log[-1]["step"] == 200
    assert log[-1]["copy_accuracy"] >= 0.9, log  # untrained: about 1/vocab
    assert log[-1]["loss"] < log[0]["loss"]
    ids = pretrain.copy_batch(vlm.model.config.text_config.vocab_size, 8, 24, torch.Generator().manual_seed(99))
    with torch.no_grad():
        pred = vlm.model(input_ids=ids).logits[:, 24:-1].argmax(-1)
    assert (pred == ids[:, 25:]).float().mean() >= 0.9  # fresh sequences: it copies, not memorizes
    _, again = run()
    assert again == log
    with pytest.raises(ValueError, match="steps"):
        pretrain.copy_pretrain(vlm, 0)
