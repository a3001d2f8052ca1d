"""
Benchmark of the data pipeline (not a test): pretokenize throughput in tokens/s and BatchLoader batches/s.

    python -m bench.data --data ../shared/data

--data must hold the Llama 2 tokenizer.model and TinyStories-train.head-2MiB.txt (../shared/data has them).
The stories are split into JSON shards in a temporary directory, pretokenized there (story by story as in
llama2.c for reference, then batched with 1 and with N worker processes; best of --repeats, process start-up
included), and the loader draws training batches from the resulting .bin shards.
"""

import argparse
import contextlib
import io
import os
import tempfile

import tiny_stories_data as tsd
from bench.common import best_of, seconds_per_call
from loader import SHARD_DIR, BatchLoader, LoaderSettings, json_shards
from tokenizer import Tokenizer

STORIES_FILE = "TinyStories-train.head-2MiB.txt"
SHARED_DATA = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))


def quiet(fn, *args, **kwargs):
    """Call fn without its progress bars and messages."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kwargs)


def story_by_story(data_dir, model):
    """llama2.c's way, for reference: one encode call per story, one process. Returns the token count."""
    enc = Tokenizer(model)
    return sum(len(enc.encode(s)) for shard in json_shards(os.path.join(data_dir, SHARD_DIR))
               for s in tsd.read_stories(shard))


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=SHARED_DATA,
                        help=f"directory with tokenizer.model and {STORIES_FILE} (default: ../shared/data)")
    parser.add_argument("--shards", type=int, default=8, help="JSON shards to split the stories into (default: 8)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="pretokenize processes (default: cpu count)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each pretokenize variant (default: 3)")
    parser.add_argument("--batch_size", type=int, default=64, help="loader batch size (default: 64)")
    parser.add_argument("--max_seq_len", type=int, default=512, help="loader sequence length (default: 512)")
    parser.add_argument("--n_batches", type=int, default=1000, help="loader batches to time (default: 1000)")
    parser.add_argument("--device", default="cpu", help="loader device, e.g. cuda to include the copy (default: cpu)")
    args = parser.parse_args()

    model, stories_txt = os.path.join(args.data, "tokenizer.model"), os.path.join(args.data, STORIES_FILE)
    for path in (model, stories_txt):
        if not os.path.isfile(path):
            parser.error(f"{path} not found: pass --data DIR holding tokenizer.model and {STORIES_FILE}")

    with tempfile.TemporaryDirectory() as tmp:
        with open(stories_txt, encoding="utf-8") as f:
            text = f.read()
        complete = text[:text.rindex(tsd.END_OF_TEXT)]  # the file ends inside an unfinished story
        n_stories = complete.count(tsd.END_OF_TEXT) + 1
        with open(os.path.join(tmp, "stories.txt"), "w", encoding="utf-8") as f:
            f.write(complete)
        quiet(tsd.download, tmp, source=os.path.join(tmp, "stories.txt"), tokenizer_model=model,
              stories_per_shard=-(-n_stories // args.shards))
        n_shards = len(json_shards(os.path.join(tmp, SHARD_DIR)))

        n_tokens, dt = best_of(lambda: story_by_story(tmp, model), args.repeats)
        print(f"data: {stories_txt}: {n_stories:,} stories, {n_tokens:,} tokens with BOS, {n_shards} shards")
        print(f"pretokenize, story by story, 1 process (llama2.c): {n_tokens / dt:12,.0f} tokens/s")
        for workers in sorted({1, args.workers}):
            n, dt = best_of(lambda: quiet(tsd.pretokenize, 0, tmp, workers=workers, tokenizer_model=model),
                            args.repeats)
            assert n == n_tokens
            print(f"pretokenize, batched, {workers} worker(s):              {n / dt:12,.0f} tokens/s")

        loader = BatchLoader("train", LoaderSettings(args.batch_size, args.max_seq_len, data_dir=tmp, device=args.device))
        rate = 1 / seconds_per_call(loader.next_batch, args.n_batches, 10, args.device)
        print(f"loader, train, batch {args.batch_size} x {args.max_seq_len} on {args.device}: {rate:,.0f} batches/s "
              f"({rate * args.batch_size * args.max_seq_len / 1e6:,.1f}M tokens/s)")


if __name__ == "__main__":
    main()
