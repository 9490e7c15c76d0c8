"""UniTrans from Python: VCRA on a Hugging Face ``transformers`` model, trained in a plain PyTorch loop.

What it shows: ``unitrans.attach`` puts VCRA on a BERT classifier's attention (named by a map from UniTrans's
point names to the model's module names), the loop is the user's own (no trainer, no cache to clear), and the
handle counts, saves, reloads, merges and disables the adapter.

The model is a tiny BERT built from its config (random init, no download), the task is made up here: does the
sequence contain the token 7? Offline, on the CPU; it prints the accuracy before and after (0.49 -> 1.00 here; the
frozen BERT with the trained head alone, the adapter disabled: about 0.5):

    python examples/python_api.py [--steps 150] [--out runs/python_api]
"""

from __future__ import annotations

import argparse

import torch
import transformers

import unitrans

POINTS = {  # UniTrans point name -> glob over the model's module names (nn.Linear modules)
    "text.attn.q": "bert.encoder.layer.*.attention.self.query",
    "text.attn.k": "bert.encoder.layer.*.attention.self.key",
    "text.attn.v": "bert.encoder.layer.*.attention.self.value",
}
VOCAB, LENGTH, SIGNAL = 64, 12, 7


def tiny_bert(seed: int = 0) -> transformers.BertForSequenceClassification:
    """A 2-layer, 64-wide BERT classifier with random weights (the same ones for the same seed)."""
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=LENGTH + 2, num_labels=2)
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config)


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences ``(n, LENGTH)`` of tokens 8..63, half of them with the token 7 at a random place; labels
    ``(n,)``: 1 where 7 occurs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(SIGNAL + 1, VOCAB, (n, LENGTH), generator=g)
    labels = torch.arange(n) % 2
    where = torch.randint(1, LENGTH, (n,), generator=g)
    ids[labels == 1, where[labels == 1]] = SIGNAL
    return ids, labels


@torch.no_grad()
def accuracy(model, ids: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return float((model(input_ids=ids).logits.argmax(-1) == labels).float().mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", default="runs/python_api")
    args = parser.parse_args(argv)

    model = tiny_bert()
    handle = unitrans.attach(model, "vcra", rank=16, points=POINTS, train_parts=["classifier"])
    handle.print_trainable_parameters()  # the adapter and the new head train; BERT stays frozen
    train_ids, train_labels = make_data(2048, seed=1)
    test_ids, test_labels = make_data(512, seed=2)
    before = accuracy(model, test_ids, test_labels)

    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for step in range(args.steps):  # the user's own loop: nothing UniTrans-specific in it
        model.train()
        batch = torch.randint(0, len(train_ids), (32,), generator=g)
        loss = model(input_ids=train_ids[batch], labels=train_labels[batch]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    after = accuracy(model, test_ids, test_labels)
    with handle.disabled():  # the frozen BERT with the trained head alone
        without_adapter = accuracy(model, test_ids, test_labels)

    handle.save(args.out)  # adapter.safetensors + adapter.json: what a `unitrans run` writes
    again = unitrans.load_adapter(tiny_bert(), args.out)  # a fresh model, attached as the manifest says
    with torch.no_grad():
        again_logits = again.model.eval()(input_ids=test_ids).logits
        handle.merge()  # folded into BERT's weights: no hooks run
        merged_logits = model(input_ids=test_ids).logits
        handle.unmerge()
        hooked_logits = model(input_ids=test_ids).logits
    result = {
        "accuracy_before": before, "accuracy_after": after, "accuracy_adapter_disabled": without_adapter,
        "reloaded_max_diff": float((again_logits - hooked_logits).abs().max()),
        "merged_max_diff": float((merged_logits - hooked_logits).abs().max()),
        "trainable": handle.parameter_counts()["trainable"],
    }
    print(f"accuracy {before:.2f} -> {after:.2f} (adapter disabled: {without_adapter:.2f}); adapter in {args.out}/")
    return result


if __name__ == "__main__":
    main()
