# Stage 5: the BESTIE predictions on the training split become a COCO-format pseudo-label dataset.


rule export_pseudo_labels:
    input:
        marker=dataset_marker(),
        instances=f"{OUT}/bestie/instances_{config['dataset']['train_split']}.h5",
    output:
        json=f"{OUT}/pseudo_labels/{config['dataset']['train_split']}.json",
    params:
        launch=launcher(0),
        p=lambda wc: stage_params("pseudo_labels"),
        ds=lambda wc: dataset_params(),
        split=lambda wc: config["dataset"]["train_split"],
    log:
        f"{LOGS}/export_pseudo_labels.log",
    benchmark:
        f"{BENCH}/export_pseudo_labels.tsv"
    threads: 1
    resources:
        gpu=0,
        mem_mb=4000,
        runtime=60,
    shell:
        "BESTIE_RULE={rule} {params.launch} export-pseudo-labels --params {params.p:q} --dataset {params.ds:q} --split {params.split} "
        "--instances {input.instances:q} --out-json {output.json:q} > {log:q} 2>&1"
