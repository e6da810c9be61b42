"""Stand-in for modules/options.py: OptionInfo (A1111's constructor signature) and a small Options store."""


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before='', comment_after='', infotext=None, restrict_api=False,
                 category_id=None):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.onchange, self.section, self.category_id, self.refresh = onchange, section, category_id, refresh
        self.comment_before, self.comment_after, self.infotext = comment_before, comment_after, infotext
        self.restrict_api = restrict_api
        self.do_not_save = False

    def info(self, info):
        self.comment_after += f"<span class='info'>({info})</span>"
        return self

    def needs_restart(self):
        self.comment_after += " <span class='info'>(requires restart)</span>"
        return self


class Options:
    """Settings read as attributes: the saved value, else the option's default."""

    _fields = ("data", "data_labels", "restricted_opts")

    def __init__(self, data_labels, restricted_opts):
        object.__setattr__(self, "data_labels", data_labels)
        object.__setattr__(self, "data", {k: v.default for k, v in data_labels.items() if not v.do_not_save})
        object.__setattr__(self, "restricted_opts", restricted_opts)

    def __setattr__(self, key, value):
        if key in self._fields or (key not in self.data and key not in self.data_labels):
            return object.__setattr__(self, key, value)
        self.data[key] = value

    def __getattr__(self, item):
        data = self.__dict__.get("data", {})
        if item in data:
            return data[item]
        if item in self.__dict__.get("data_labels", {}):
            return self.data_labels[item].default
        raise AttributeError(item)

    def set(self, key, value, is_api=False, run_callbacks=True):
        """Sets an option; returns whether it changed (A1111 also runs its onchange)."""
        if self.data.get(key) == value:
            return False
        setattr(self, key, value)
        if run_callbacks and self.data_labels[key].onchange is not None:
            self.data_labels[key].onchange()
        return True

    def get_default(self, key):
        info = self.data_labels.get(key)
        return None if info is None else info.default

    def add_option(self, key, info):
        self.data_labels[key] = info
        if key not in self.data and not info.do_not_save:
            self.data[key] = info.default
