# `bestie predict` on a configured set of images (config section `predict`; off while `images` is null).

import shlex


def predict_checkpoint():
    """The run's checkpoint that `predict.model` names."""
    return {"maskrcnn": f"{OUT}/maskrcnn/model.pt", "bestie": f"{OUT}/bestie/model.pt"}[config["predict"]["model"]]


def predict_images():
    """`predict.images` (a file, folder or glob, or a list of them) as shell words, resolved to absolute
    paths and quoted, so that glob patterns reach `bestie predict` unexpanded."""
    images = config["predict"]["images"]
    images = [images] if isinstance(images, str) else list(images or [])
    return " ".join(shlex.quote(os.path.abspath(i)) for i in images)


rule predict:
    input:
        checkpoint=predict_checkpoint(),
    output:
        predictions=f"{OUT}/predict/predictions.json",
        images=f"{OUT}/predict/images.json",
        summary=f"{OUT}/predict/summary.json",
        overlays=directory(f"{OUT}/predict/overlays"),
    params:
        launch=launcher(0),
        p=lambda wc: stage_params("predict"),
        images=lambda wc: predict_images(),
        out=f"{OUT}/predict",
        device=device_flag(infer_gpus()),
    log:
        f"{LOGS}/predict.log",
    benchmark:
        f"{BENCH}/predict.tsv"
    threads: workflow.cores
    resources:
        gpu=infer_gpus(),
        mem_mb=8000,
        runtime=240,
    shell:
        "BESTIE_RULE={rule} {params.launch} predict {input.checkpoint:q} {params.images} --out {params.out:q} --params {params.p:q} "
        "{params.device} > {log:q} 2>&1"
