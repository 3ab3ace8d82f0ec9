"""Training data, from bytes to batches: read, validate, format, template, tokenize, pack, collate.

    types      the values passed between the steps (rows, conversations, examples, packs)
    formats    bytes -> rows -> chat conversations (alpaca, dolly, messages, prompt-completion)
    template   the chat template: one rendering for training, evaluation and serving
    tokenize   tokens with loss on assistant tokens only
    packing    examples packed into sequences (best-fit decreasing) and padding statistics
    collate    batches of torch tensors
    audit      duplicates, evaluation contamination, personal data
    pipeline   the data step itself (load_examples): the only module here that reads objects

Everything but the pipeline is a pure function, unit-testable without object storage; torch is
imported only by the collators, so validating data does not need it.
"""
