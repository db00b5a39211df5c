/**
 * A command that runs something in the foreground until Ctrl-C (synthesize without --detach)
 * handles the signal itself: stopping there is the normal end, not an interruption.
 */
type ForegroundStop = (signal: NodeJS.Signals) => void;

let foregroundStop: ForegroundStop | undefined;

export function onForegroundSignal(stop: ForegroundStop): void {
  foregroundStop = stop;
}

export function foregroundHandler(): ForegroundStop | undefined {
  return foregroundStop;
}
