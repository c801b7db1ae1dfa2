# Pseudo-label baseline, the combined metrics table and the HTML report of one run.

from bestie.sections import BASELINE_KEYS


rule score_baseline:
    input:
        marker=dataset_marker(),
        wsss=wsss_h5(),
        points=points_h5(),
    output:
        metrics=f"{OUT}/bestie/baseline_{config['dataset']['train_split']}.json",
    params:
        launch=launcher(0),
        ds=lambda wc: dataset_params(),
        split=lambda wc: config["dataset"]["train_split"],
        # only the bestie keys the baseline reads: a change of bestie.lr does not rerun it
        p=lambda wc: stage_params("bestie", keys=BASELINE_KEYS),
        points=lambda wc, input: f"--points {input.points}" if input.points else "",
    log:
        f"{LOGS}/score_baseline.log",
    threads: 1
    resources:
        gpu=0,
        mem_mb=4000,
        runtime=60,
    shell:
        "BESTIE_RULE={rule} {params.launch} score-baseline --params {params.p:q} --dataset {params.ds:q} --split {params.split} "
        "--wsss {input.wsss:q} {params.points} --out-metrics {output.metrics:q} > {log:q} 2>&1"


def report_inputs(wildcards):
    train, val = config["dataset"]["train_split"], config["dataset"]["eval_split"]
    inputs = {
        "cams_dense": f"{OUT}/cams/dense_diagnostics.json",
        "wsss": f"{OUT}/wsss/diagnostics.json",
        "baseline": f"{OUT}/bestie/baseline_{train}.json",
        "bestie": f"{OUT}/bestie/metrics_{train}.json",
        "maskrcnn": f"{OUT}/evaluate/metrics_{val}.json",
        "bestie_log": f"{OUT}/bestie/train_log.jsonl",
        "maskrcnn_log": f"{OUT}/maskrcnn/train_log.jsonl",
        "instances": f"{OUT}/bestie/instances_{train}.h5",
        "predictions": f"{OUT}/evaluate/predictions_{val}.json",
        "wsss_maps": wsss_h5(),
    }
    kinds = [] if config["wsss"].get("import_png_dir") else ["dense"]
    if config["wsss"].get("import_png_dir"):
        del inputs["wsss"], inputs["cams_dense"]
    if not point_setting():
        inputs["cams_pam"] = f"{OUT}/cams/pam_diagnostics.json"
        kinds.insert(0, "pam")
    for kind in kinds:
        inputs[f"cam_overlays_{kind}"] = f"{OUT}/cams/{kind}_overlays"
        for ckpt in classifier_checkpoints(kind):  # one log per classifier (ensemble member)
            name = Path(ckpt).stem.replace(f"{kind}_", f"{kind} ", 1)
            inputs[f"classifier_{name}_log"] = ckpt[: -len(".pt")] + "_log.jsonl"
    return inputs


rule report:
    input:
        unpack(report_inputs),
    output:
        html=f"{OUT}/report.html",
        metrics=f"{OUT}/metrics.json",
    params:
        launch=launcher(0),
        ds=lambda wc: dataset_params(),
        run=RUN,
        # the benchmark folder is read, not an input: it fills while the jobs finish
        inputs=lambda wc, input: json.dumps({**dict(input.items()), "benchmarks": BENCH}, sort_keys=True),
    log:
        f"{LOGS}/report.log",
    threads: 1
    resources:
        gpu=0,
        mem_mb=4000,
        runtime=30,
    shell:
        "BESTIE_RULE={rule} {params.launch} report --run {params.run:q} --dataset {params.ds:q} --inputs {params.inputs:q} "
        "--out-html {output.html:q} --out-metrics {output.metrics:q} > {log:q} 2>&1"
