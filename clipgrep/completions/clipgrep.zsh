
#compdef clipgrep

_clipgrep_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _CLIPGREP_COMPLETE=complete_zsh clipgrep)
}

compdef _clipgrep_completion clipgrep

