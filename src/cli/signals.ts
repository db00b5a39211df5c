/**
 * A command that runs something in the foreground until Ctrl-C (synthesize without --detach)
 * handles the signal itself: stopping there is the normal end, not an interruption.
 */
let foregroundStop: ((signal: NodeJS.Signals) => Promise<void>) | undefined;

export function onForegroundSignal(stop: (signal: NodeJS.Signals) => Promise<void>): void {
  foregroundStop = stop;
}

export function foregroundHandler(): ((signal: NodeJS.Signals) => Promise<void>) | undefined {
  return foregroundStop;
}
