"""The Dataset tab's tag view: tag frequencies across the folder, a tag's images, rename or remove a tag.

Layout and wiring only; the work is in `actions.py`. The table follows the caption grid (the counts that
training records in `ss_tag_frequency`), and renaming or removing changes the grid: "Save captions" writes it.
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from . import actions


def build(ui: SimpleNamespace) -> None:
    with gr.Accordion("Tags", open=False):
        with gr.Row():
            ui.tag_table = gr.Dataframe(headers=["tag", "count"], datatype=["str", "number"], col_count=(2, "fixed"),
                                        interactive=False, elem_id="lora_train_tag_table",
                                        label="Tag frequencies (as ss_tag_frequency records them): click a tag")
            with gr.Column():
                ui.tag_name = gr.Textbox(label="Tag", max_lines=1)
                ui.tag_new = gr.Textbox(label="Rename to", max_lines=1)
                with gr.Row():
                    ui.tag_rename = gr.Button("Rename in all captions")
                    ui.tag_remove = gr.Button("Remove from all captions")
        ui.tag_images = gr.Gallery(label="Images with the tag", columns=6, height=240)


def wire(ui: SimpleNamespace) -> None:
    def pick(folder, rows, table, event: gr.SelectData):
        tag = actions.tag_in_row(table, event.index[0])
        return tag, actions.images_with_tag(folder, rows, tag)

    ui.grid.change(actions.tag_table, [ui.grid], [ui.tag_table])
    ui.tag_table.select(pick, [ui.folder, ui.grid, ui.tag_table], [ui.tag_name, ui.tag_images])
    ui.tag_rename.click(actions.rename_tag, [ui.grid, ui.tag_name, ui.tag_new], [ui.grid])
    ui.tag_remove.click(actions.remove_tag, [ui.grid, ui.tag_name], [ui.grid])
