#!/usr/bin/env bash
# `make demo`: the main job on an embedded default.
#
# 1. The model: models/clipdb-flickr8k-rn128, the small CLIP (ResNet image
#    tower) that clipdb trained itself on Flickr8k (see its README: no
#    pretrained weights are
#    reachable from this machine). CLIPDB_DEMO_MODEL=DIR takes another model
#    directory, for example the real ViT-B/32 from `clipdb model fetch
#    openai/clip-vit-base-patch32 DIR` where there is a network, or
#    CLIPDB_DEMO_MODEL=seeded for a seeded random ViT-B/32 in the published
#    layout (generated with python3 + numpy).
# 2. A database of the COCO subset (338 photos, 1,690 captions) from
#    ../shared/data, ingested incrementally: a second run skips what is stored.
#    A database made with another model is made again.
# 3. The four kinds of query, exact and IVF.
# 4. `clipdb serve` on the database: the web page at the URL it prints
#    (CLIPDB_DEMO_PORT, default 8080). CLIPDB_DEMO_SERVE=0 stops after step 3
#    (scripts and the browser tests, which start the server themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CLIPDB_BIN:-build/clipdb}
PY=${PY:-/usr/bin/python3}
SHARED=${CLIPDB_SHARED:-../shared}
DATA=$SHARED/data/coco-subset
WORK=${CLIPDB_DEMO_DIR:-.cache/demo}
MODEL=${CLIPDB_DEMO_MODEL:-$PWD/models/clipdb-flickr8k-rn128}
[ "$MODEL" != seeded ] || MODEL=$WORK/clip-vit-b-32-seeded
DB=$WORK/coco.db

if [ ! -d "$DATA/images" ]; then
  echo "demo: $DATA not found: the shared data folder must sit beside the repository (../shared)" >&2
  exit 1
fi
mkdir -p "$WORK"
say() { printf '\n== %s\n' "$*"; }

if [ "$MODEL" = "$WORK/clip-vit-b-32-seeded" ] && [ ! -f "$MODEL/open_clip_model.safetensors" ]; then
  say "generating a seeded random CLIP ViT-B/32 in $MODEL (real file format; random weights)"
  "$PY" tools/gen_model.py "$MODEL" --size b32 --keys openai --dtype F32 --seed 42
fi
say "the model"
"$BIN" model info "$MODEL"

say "embedding one text and one photo (first values of each vector)"
photo=$(ls "$DATA/images" | sort | sed -n 1p)  # sed reads all: no SIGPIPE under pipefail
"$BIN" embed --model "$MODEL" --text "a photo of a cat" --image "$DATA/images/$photo"

# the database remembers which model made it; another model makes it again
if [ -f "$DB" ] && [ "$(cat "$DB.model" 2>/dev/null)" != "$MODEL" ]; then
  say "$DB was made with another model: making it again with $MODEL"
  rm -f "$DB" "$DB-wal" "$DB-shm"
fi
[ -f "$DB" ] || { "$BIN" init "$DB" --model "$MODEL" && printf '%s\n' "$MODEL" > "$DB.model"; }
say "ingesting $DATA (images and captions; incremental)"
"$BIN" add "$DB" --images "$DATA/images" --captions "$DATA/captions.jsonl"
"$BIN" stats "$DB"

say "an IVF index over the images"
"$BIN" index "$DB" --ivf --nlist 16 --target image

if [ "$MODEL" = "$WORK/clip-vit-b-32-seeded" ]; then
  echo; echo "(The weights are random, so the neighbours below show the machinery, not meaning.)"
fi
# A query in the self-trained model's world (100 of Flickr8k's 6,000 training
# photos show skiing); the model's README shows where it fails, "a dog
# catching a frisbee" among them.
q="people skiing down a snowy slope"
say "text -> image (exact, cosine): $q"
"$BIN" search "$DB" --text "$q" --target image -k 5
say "text -> image (IVF, nprobe 4)"
"$BIN" search "$DB" --text "$q" --target image -k 5 --index ivf --nprobe 4
say "image -> text (dot product)"
"$BIN" search "$DB" --image "$DATA/images/$photo" --target text -k 5 --metric dot
say "image -> image (L2)"
"$BIN" search "$DB" --image "$DATA/images/$photo" --target image -k 5 --metric l2
say "text -> text, only captions of val2017 images"
"$BIN" search "$DB" --text "two people riding horses on a beach" --target text -k 5 --where split=val2017
say "done: database $DB, model $MODEL"
if [ "${CLIPDB_DEMO_SERVE:-1}" != 0 ]; then
  say "serving $DB (Ctrl-C stops)"
  exec "$BIN" serve "$DB" --port "${CLIPDB_DEMO_PORT:-8080}"
fi
