"""An exception module that services and clients can both import."""


class CustomError(Exception):
    pass
