"""histosurv score: a slide archive to per-slide and per-patient risks, resumable, here or on Ray."""

from __future__ import annotations

import argparse
import sys
import time

from ._slide_options import add_slide_options, print_notes, slide_config


def add_parser(sub) -> None:
    p = sub.add_parser(
        "score",
        help="score a slide archive (manifest CSV) into Parquet tables; resumable; --ray to scale out",
        description="Scores every slide of the manifest (CSV: path, slide_id, case_id) with a fusion model of the "
        "repository and writes OUT/slides.parquet and OUT/patients.parquet (a patient's risk is the mean of its "
        "slides'), CLAM-style features in OUT/features/ and, with --heatmaps, attention maps in OUT/heatmaps/. "
        "Each slide's result is committed as it finishes: run the same command again after an interruption and it "
        "goes on where it stopped. A slide that cannot be scored is recorded with its reason and the run goes on; "
        "the exit status is 1 when any slide failed.",
    )
    p.add_argument("manifest", help="CSV with columns path, slide_id, case_id (relative paths: from the CSV's folder)")
    p.add_argument("--repo", required=True, help="model repository root")
    p.add_argument("--out", required=True, help="run folder (created; an existing one is resumed)")
    p.add_argument("--model", help="survival model in the repository (default: the repository's only one)")
    p.add_argument("--version", type=int, help="model version (default: the highest, fixed in the run folder when the run starts)")
    p.add_argument("--engine", default="auto", help="survival-model engine: a manifest key, or auto (default: auto)")
    p.add_argument("--genes", help="gene table CSV (case_id + one column per gene)")
    p.add_argument("--covariates", metavar="CSV",
                   help="clinical covariates CSV (case_id + one column per covariate, as people write them: age, "
                   "sex, stage), for models trained with covariates; without it such a model scores without them")
    p.add_argument("--heatmaps", action="store_true", help="write OUT/heatmaps/<slide_id>.png (attention over the thumbnail)")
    p.add_argument("--explain", action="store_true",
                   help="write OUT/explanations/<slide_id>.json: gene attributions by occlusion (one fusion pass per "
                   "gene group) and the most attended patches, or why the model cannot give them (not with --ray)")
    p.add_argument("--restart", action="store_true", help="discard the results already in --out and start over")
    p.add_argument("--retry-failed", action="store_true", help="score again the slides that failed before")
    p.add_argument("--ray", metavar="ADDRESS", help="run on Ray Data: 'auto' (this machine's cluster, else a local one), "
                   "'local', or a cluster address; needs pip install 'histosurv[ray]'")
    p.add_argument("--ray-workers", type=int, help="encoder actors with --ray (default: one per GPU, else 1)")
    add_slide_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..runtime.batch.runner import score_archive
    from ..runtime.batch.scoring import ScoringConfig

    config = ScoringConfig(
        repository=args.repo, model=args.model, version=args.version, encoder=args.encoder,
        encoder_version=args.encoder_version, engine=args.engine, encoder_engine=args.encoder_engine, genes=args.genes,
        covariates=args.covariates, slide=slide_config(args), mpp=args.mpp, allow_mismatch=args.allow_encoder_mismatch,
    )
    if args.explain and args.ray:
        from ..errors import InputError

        raise InputError("--explain runs with the local backend only; drop --ray or --explain")
    started = time.monotonic()
    result = score_archive(args.manifest, args.out, config, ray=args.ray, workers=args.ray_workers, restart=args.restart,
                           retry_failed=args.retry_failed, heatmaps=args.heatmaps,
                           explain=args.explain, log=lambda n: print_notes("score", [n]))
    slides = result.slides
    ok = slides[slides["status"] == "scored"]
    print(
        f"{len(slides)} slides: {len(ok)} scored, {result.failed} failed; {result.scored_now} this run "
        f"({result.skipped} done before) in {time.monotonic() - started:.1f} s, {result.per_hour:.0f} slides/h; "
        f"{len(result.patients)} patients -> {args.out}/slides.parquet, {args.out}/patients.parquet"
    )
    for row in slides[slides["status"] == "failed"].itertuples():
        print(f"  failed: {row.slide_id} ({row.path}): {row.error}", file=sys.stderr)
    return 1 if result.failed else 0
