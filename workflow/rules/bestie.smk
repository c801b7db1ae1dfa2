# Stage 4: BESTIE training (semantic knowledge transfer + self-refinement) and its predictions on the
# training split, scored against GT masks where they exist (METHOD.md section 4).


rule train_bestie:
    input:
        marker=dataset_marker(),
        wsss=wsss_h5(),
        points=points_h5(),
    output:
        checkpoint=f"{OUT}/bestie/model.pt",
        log=f"{OUT}/bestie/train_log.jsonl",
    params:
        p=lambda wc: stage_params("bestie"),
        # the grouping of in-training validation and of the learning probe: that of the instances section
        grouping=lambda wc: stage_params("instances", keys=GROUPING_KEYS),
        ds=lambda wc: dataset_params(),
        points=lambda wc, input: f"--points {input.points}" if input.points else "",
        launch=launcher(train_gpus()),
        device=device_flag(train_gpus()),
    log:
        f"{LOGS}/train_bestie.log",
    benchmark:
        f"{BENCH}/train_bestie.tsv"
    threads: workflow.cores
    resources:
        gpu=train_gpus(),
        mem_mb=16000,
        runtime=1440,
    shell:
        "BESTIE_RULE={rule} {params.launch} train-bestie --params {params.p:q} --grouping {params.grouping:q} --dataset {params.ds:q} --wsss {input.wsss:q} "
        "{params.points} --out-checkpoint {output.checkpoint:q} --out-log {output.log:q} {params.device} "
        "> {log:q} 2>&1"


rule predict_instances:
    input:
        marker=dataset_marker(),
        checkpoint=f"{OUT}/bestie/model.pt",
    output:
        instances=f"{OUT}/bestie/instances_{{split}}.h5",
        metrics=f"{OUT}/bestie/metrics_{{split}}.json",
    params:
        launch=launcher(0),
        p=lambda wc: stage_params("instances"),
        ds=lambda wc: dataset_params(),
        device=device_flag(infer_gpus()),
    log:
        f"{LOGS}/predict_instances_{{split}}.log",
    benchmark:
        f"{BENCH}/predict_instances_{{split}}.tsv"
    threads: workflow.cores
    resources:
        gpu=infer_gpus(),
        mem_mb=8000,
        runtime=240,
    shell:
        "BESTIE_RULE={rule} {params.launch} predict-instances --params {params.p:q} --dataset {params.ds:q} --split {wildcards.split} "
        "--checkpoint {input.checkpoint:q} --out-instances {output.instances:q} --out-metrics {output.metrics:q} "
        "{params.device} > {log:q} 2>&1"
