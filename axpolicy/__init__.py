"""axpolicy: let a stock Postfix or Exim be the SMTP front-end of a mail cluster.

The daemon answers one question for the MTA -- which back-end holds this
recipient? -- from a user map (LDAP directory or a local file), with three
outcomes that are never confused: found, not found, temporary failure.
"""

__version__ = "0.1.0"
