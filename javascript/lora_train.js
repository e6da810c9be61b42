// sd-webui-lora-train: connects the tab's jobs to the WebUI's own progress bar, across page reloads.

// Called by the Start buttons before their Python handler: gives the job a task id ("task(...)") that the
// handler registers with the WebUI's progress API, and shows the WebUI's progress bar for it.
function lora_train_start() {
    var id = randomId();
    localSet("lora_train_task_id", id);
    lora_train_follow(id, 40);
    var args = Array.from(arguments);
    args[0] = id;
    return args;
}

// The bar shows the job's own line (it has the one ETA, from the measured step time) and the percentage,
// not the WebUI's second ETA, which counts latent caching and previews as training time.
function lora_train_bar_text(container, res) {
    var bar = container.parentNode.querySelector(".progressDiv .progress");
    if (!bar || !res.textinfo) return;
    var percent = res.progress > 0 ? " " + (res.progress * 100).toFixed(0) + "%" : "";
    bar.textContent = res.textinfo + percent;
}

function lora_train_follow(id, inactivityTimeout) {
    var container = gradioApp().getElementById("lora_train_progress");
    if (!container) return;
    requestProgress(id, container, gradioApp().getElementById("lora_train_previews"), function() {
        localRemove("lora_train_task_id");
    }, function(res) {
        lora_train_bar_text(container, res);
    }, inactivityTimeout);
}

// After a page reload: follow the job that was running, and let the tab poll its status again.
onUiLoaded(function() {
    var id = localGet("lora_train_task_id");
    if (!id) return;
    lora_train_follow(id, 0);
    // gradio binds the button's handler after the page reports itself loaded; click once it has
    setTimeout(function() {
        var watch = gradioApp().getElementById("lora_train_watch");
        if (watch) watch.click();
    }, 2000);
});
