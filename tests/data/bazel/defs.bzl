"""Genrules whose outputs fill a Bazel disk cache with a few tens of MB of varied blobs.

33 genrules, 36 outputs (about 45 MB: the disk cache gets 33 ac/ entries and 99 cas/
blobs).  Only coreutils and gzip (Essential in Debian) run, under bash (genrule's shell),
and every output is deterministic: the same bytes in every build (with the same coreutils
and gzip).  Sizes go from 0 bytes to about 4 MB; the contents are compressible text,
incompressible gzip streams, and mixes and copies of both (so a deduplicating store sees
shared chunks and equal blobs).  Layers: sources, then mixes/sorts/base64/split/copies of
them, then a bundle and a list of sizes, then the checksums of (nearly) everything.
"""

# Row counts of the text sources ("row N of text_I", about 20 bytes a row).
TEXT_ROWS = [100, 3000, 30000, 80000, 150000, 200000]

# Counts of random 32-bit numbers (about 5 bytes each once gzipped) of the noise sources.
NOISE_COUNT = [50, 2000, 20000, 100000, 300000, 600000]

def _text(i):
    name = "text_%d" % i
    native.genrule(
        name = name,
        outs = [name + ".txt"],
        cmd = "seq -f 'row %%.0f of %s' 1 %d > $@" % (name, TEXT_ROWS[i]),
    )
    return name

def _noise(i):
    # shuf draws from a deterministic random source (a gzip stream of a sequence, which
    # is long enough for the draws); gzip -n then makes the result incompressible.
    name = "noise_%d" % i
    count = NOISE_COUNT[i]
    native.genrule(
        name = name,
        outs = [name + ".gz"],
        cmd = ("shuf -i 0-4294967295 -n %d --random-source=<(seq %d %d | gzip -n -1) " +
               "| gzip -n -1 > $@") % (count, i, 4 * count + 1000),
    )
    return name

def workload():
    """Declares every target of the package; //:all builds them all."""
    texts = [_text(i) for i in range(len(TEXT_ROWS))]
    noises = [_noise(i) for i in range(len(NOISE_COUNT))]

    # Layer 1: mixes of a text and a noise source (their chunks are shared with both).
    mixes = []
    for i in range(len(texts)):
        name = "mix_%d" % i
        native.genrule(
            name = name,
            srcs = [":" + texts[i], ":" + noises[len(noises) - 1 - i]],
            outs = [name + ".bin"],
            cmd = "cat $(SRCS) > $@",
        )
        mixes.append(name)

    # Sorted (lexicographically) texts: the same lines in another order.
    for i in [2, 3, 5]:
        native.genrule(
            name = "sorted_%d" % i,
            srcs = [":" + texts[i]],
            outs = ["sorted_%d.txt" % i],
            cmd = "LC_ALL=C sort $< > $@",
        )

    # base64 of noise: text, but only about 3/4 as dense as the bytes it encodes.
    for i in [1, 3, 4]:
        native.genrule(
            name = "b64_%d" % i,
            srcs = [":" + noises[i]],
            outs = ["b64_%d.txt" % i],
            cmd = "base64 $< > $@",
        )

    # One action with several outputs: the largest noise source cut in four.
    native.genrule(
        name = "parts",
        srcs = [":" + noises[5]],
        outs = ["part_%s" % c for c in ["a", "b", "c", "d"]],
        cmd = "split -n 4 -a 1 $< $(RULEDIR)/part_",
    )

    # Copies: outputs whose bytes equal other outputs' (one blob in the CAS).
    native.genrule(
        name = "copy_text",
        srcs = [":" + texts[3]],
        outs = ["copy_text.txt"],
        cmd = "cp $< $@",
    )
    native.genrule(
        name = "copy_noise",
        srcs = [":" + noises[4]],
        outs = ["copy_noise.gz"],
        cmd = "cp $< $@",
    )

    # Tiny and empty outputs, and an executable one.
    native.genrule(
        name = "empty",
        outs = ["empty.out"],
        cmd = ": > $@",
    )
    native.genrule(
        name = "hello",
        outs = ["hello.txt"],
        cmd = "echo hello > $@",
    )
    native.genrule(
        name = "tool",
        outs = ["tool.sh"],
        cmd = "printf '#!/bin/sh\\necho tool ran\\n' > $@ && chmod +x $@",
        executable = True,
    )

    # Layer 2: outputs that depend on layer-1 outputs.
    native.genrule(
        name = "bundle",
        srcs = [":mix_2", ":b64_3", ":sorted_3", ":part_b"],
        outs = ["bundle.bin"],
        cmd = "cat $(SRCS) > $@",
    )
    native.genrule(
        name = "sizes",
        srcs = [":" + n for n in mixes] + [":parts", ":empty", ":hello"],
        outs = ["sizes.txt"],
        cmd = "wc -c $(SRCS) > $@",
    )

    # Layer 3: a checksum of (nearly) everything, so it depends on the whole graph.
    native.genrule(
        name = "digests",
        srcs = [":" + n for n in texts + noises + mixes] + [
            ":sorted_2",
            ":sorted_3",
            ":sorted_5",
            ":b64_1",
            ":b64_3",
            ":b64_4",
            ":parts",
            ":copy_text",
            ":copy_noise",
            ":empty",
            ":hello",
            ":tool",
            ":bundle",
            ":sizes",
        ],
        outs = ["digests.txt"],
        cmd = "sha256sum $(SRCS) > $@",
    )
