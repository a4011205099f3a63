"""What the benchmark gives away without the image: chance and a text-only classifier."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .data import LETTERS


def chance_level(items: Sequence) -> float:
    """Expected accuracy of guessing uniformly among each item's options."""
    return float(np.mean([1.0 / len(it.options) for it in items]))


def _option_features(it, i: int) -> list[str]:
    q = it.question.lower().replace("?", "").split()
    o = it.options[i].lower().split()
    feats = [f"q:{w}" for w in q] + [f"o:{w}" for w in o] + [f"opt:{it.options[i].lower()}"]
    feats += [f"qo:{a}|{b}" for a in q for b in o]
    feats += [f"pos:{i}", f"pos:{i}/{len(it.options)}", f"len:{min(len(it.options[i]) // 4, 8)}"]
    feats += [f"qpos:{w}|{i}" for w in q]
    return feats


def text_only_baseline(train_items: Sequence, test_items: Sequence, *, C: float = 1.0) -> float:
    """Test accuracy of a classifier that sees only the question and option texts.

    Each option is a bag of words of the question, the option, their cross products, the
    option's position and length; a logistic regression scores options (correct vs not) and
    the best-scoring option is the prediction. Near :func:`chance_level` means the text alone
    gives the answer away nowhere.
    """
    from sklearn.feature_extraction import FeatureHasher
    from sklearn.linear_model import LogisticRegression

    if not train_items or not test_items:
        raise ValueError("text_only_baseline needs non-empty train and test items")
    hasher = FeatureHasher(n_features=2 ** 18, input_type="string")

    def rows(items):
        feats, labels, owner = [], [], []
        for k, it in enumerate(items):
            for i in range(len(it.options)):
                feats.append(_option_features(it, i))
                labels.append(int(LETTERS[i] == it.answer))
                owner.append(k)
        return hasher.transform(feats), np.array(labels), np.array(owner)

    Xtr, ytr, _ = rows(train_items)
    clf = LogisticRegression(C=C, max_iter=2000)
    clf.fit(Xtr, ytr)
    Xte, _, owner = rows(test_items)
    score = clf.decision_function(Xte)
    correct, start = 0, 0
    for k, it in enumerate(test_items):
        n = len(it.options)
        pred = int(np.argmax(score[start:start + n]))
        correct += LETTERS[pred] == it.answer
        start += n
    return correct / len(test_items)
