"""The `clone` command line: a thin room above the two halves.

It parses arguments and settings, finds the persona folder, calls the pipeline functions of
`training/` (import, prepare, train, evaluate, retrain) and `bot/` (chat, serve), and prints what
happened. It holds no pipeline logic of its own. One module per group of subcommands:

    main.py      the parser, `--version`, logging, one-line errors
    options.py   flags generated from the training config dataclasses, with defaults shown
    common.py    settings and the persona a command works on, and the "using ..." line
    data.py      init, import, prepare
    model.py     train, adapters, eval, retrain
    talk.py      chat, serve, serve-model
    start.py     start: the whole path for one persona
"""
