# Stage 6: Mask R-CNN trained on the pseudo labels, evaluated on the held-out split.


rule train_maskrcnn:
    input:
        marker=dataset_marker(),
        pseudo=f"{OUT}/pseudo_labels/{config['dataset']['train_split']}.json",
    output:
        checkpoint=f"{OUT}/maskrcnn/model.pt",
        log=f"{OUT}/maskrcnn/train_log.jsonl",
    params:
        p=lambda wc: stage_params("maskrcnn"),
        ds=lambda wc: dataset_params(),
        launch=launcher(train_gpus()),
        device=device_flag(train_gpus()),
    log:
        f"{LOGS}/train_maskrcnn.log",
    benchmark:
        f"{BENCH}/train_maskrcnn.tsv"
    threads: workflow.cores
    resources:
        gpu=train_gpus(),
        mem_mb=16000,
        runtime=1440,
    shell:
        "BESTIE_RULE={rule} {params.launch} train-maskrcnn --params {params.p:q} --dataset {params.ds:q} --pseudo-json {input.pseudo:q} "
        "--out-checkpoint {output.checkpoint:q} --out-log {output.log:q} {params.device} > {log:q} 2>&1"


rule evaluate:
    input:
        marker=dataset_marker(),
        checkpoint=f"{OUT}/maskrcnn/model.pt",
    output:
        metrics=f"{OUT}/evaluate/metrics_{config['dataset']['eval_split']}.json",
        predictions=f"{OUT}/evaluate/predictions_{config['dataset']['eval_split']}.json",
    params:
        launch=launcher(0),
        p=lambda wc: stage_params("evaluate"),
        ds=lambda wc: dataset_params(),
        split=lambda wc: config["dataset"]["eval_split"],
        device=device_flag(infer_gpus()),
    log:
        f"{LOGS}/evaluate.log",
    benchmark:
        f"{BENCH}/evaluate.tsv"
    threads: workflow.cores
    resources:
        gpu=infer_gpus(),
        mem_mb=8000,
        runtime=120,
    shell:
        "BESTIE_RULE={rule} {params.launch} evaluate --params {params.p:q} --dataset {params.ds:q} --split {params.split} "
        "--checkpoint {input.checkpoint:q} --out-metrics {output.metrics:q} "
        "--out-predictions {output.predictions:q} {params.device} > {log:q} 2>&1"
