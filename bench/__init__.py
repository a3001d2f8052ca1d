"""
Benchmarks, each run from the repository root as a module (so that it imports the project's modules from there):

    python -m bench.train        training-step throughput: ours, train.py's loop, the authors' code; --baseline REF
    python -m bench.data         the data pipeline: pretokenize tokens/s, loader batches/s
    python -m bench.generate     generation tokens/s with and without the KV cache
    python -m bench.kernels      the fused linear + cross-entropy kernel's variants (CUDA)
    python -m bench.relational   the fused position-relative attention kernel (CUDA, or the Triton interpreter)

bench.authors times the authors' implementation in a process of its own (bench.train runs it), bench.baseline
loads the code of another commit beside the current one, bench.common holds the timing helpers they share.
"""
