"""Command-line flags of sd-webui-lora-train, added to the WebUI's parser before it parses the command line."""


def preload(parser):
    parser.add_argument("--lora-train-work-dir", type=str, default=None,
                        help="sd-webui-lora-train: folder for training logs, checkpoints and previews "
                             "(default: outputs/lora-train)")
