/**
 * Whether an overlay fits the base it is applied to, checked before anything is written: the
 * base id, the base targets the header lists (the id covers them, so they must be the base's
 * own), and every RAM target against the base's RAM blocks (one of them, at most as large). A header
 * declares sizes; only the base says what exists, so nothing is sized from the header alone.
 */
import type { OverlayHeader } from '../overlay/format.js';
import type { BaseVm } from '../targets/base-vm.js';
import { BaseMismatchError, CorruptInputError } from '../util/errors.js';

export function checkOverlayFitsBase(header: OverlayHeader, base: BaseVm): void {
  if (header.base.id !== base.id) {
    throw new BaseMismatchError(
      `this overlay was made for base ${header.base.id.slice(0, 12)}, not for base ${base.id.slice(0, 12)}`,
      { expected_base: header.base.id, actual_base: base.id },
    );
  }
  const listed = header.base.targets;
  const same =
    listed.length === base.infos.length &&
    listed.every((t, i) => {
      const b = base.infos[i];
      return b !== undefined && t.kind === b.kind && t.name === b.name && t.size === b.size && t.digest === b.digest;
    });
  if (!same) throw new CorruptInputError("the overlay's list of base targets differs from the base it names");
  for (const t of header.targets) {
    if (t.kind !== 'ram') continue;
    const b = base.targets.find((x) => x.kind === 'ram' && x.name === t.name);
    if (!b || t.size > b.size) {
      throw new CorruptInputError(
        `the overlay's RAM block ${JSON.stringify(t.name)} (${t.size} bytes) is not the base's`,
      );
    }
  }
}
