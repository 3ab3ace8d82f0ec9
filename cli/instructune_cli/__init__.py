"""`instructune`: the tenants' command line for InstructionTunes.

    app         the commands (Typer) and their exit codes; nothing else imports it
    datacheck   `validate`: the job's own data step on a file or S3 object, with a tokenizer
    watch       `watch`: the tune followed until it ends, as a live Rich display
    plot        `plot`: the loss curve and tuned-vs-base evaluation as a PNG (matplotlib, Agg)
    remote      `logs` and `ask`: the tune's Ray job logs and its served model
    connect     the API server, from the kubeconfig, through the operator's own Kube client
    proxy       HTTP to a Service inside the cluster, through the API server's pod proxy
    datareport, describe, progress, curves
                pure: what the commands print or plot, computed from plain values

Everything the job decides about data (formats, validation, audits, tokenization, the
invalid-rows policy) is instructune_jobs' own code, and everything the status says is the
operator's: the CLI only reads and shows them.
"""
