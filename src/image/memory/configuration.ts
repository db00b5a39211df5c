/**
 * The configuration section (QEMU_VM_CONFIGURATION, savevm.c `vmstate_configuration`) that
 * follows the file header: be32 length + machine type, then optional subsections, each
 * 0x05 + u8 name length + name + be32 version + fields. 7.2 knows three:
 *   configuration/target-page-bits   be32 (only on targets with variable page size)
 *   configuration/capabilities       be32 count, count × (u8 len + capability name)
 *                                    (written when a "validated" capability — x-ignore-shared — is on)
 *   configuration/uuid               16 bytes (with the validate-uuid parameter)
 * There is no section footer after it.
 */
import { UnsupportedError, check } from '../../util/errors.js';
import { ConfigSubsection, MAX_CAPABILITIES, MAX_MACHINE_NAME, Section } from './format.js';
import { PAGE_SHIFT } from '../../util/page.js';
import type { SequentialReader } from './reader.js';

export interface Configuration {
  machineType: string;
  /** Capabilities listed in the capabilities subsection (empty when absent). */
  capabilities: string[];
  /** Guest UUID when the uuid subsection is present. */
  uuid: string | null;
}

/** Reads the section body; the 0x07 type byte has been consumed. */
export async function readConfiguration(r: SequentialReader): Promise<Configuration> {
  await r.ensure(4 + MAX_MACHINE_NAME);
  const lenAt = r.offset;
  const len = r.be32();
  check(len > 0 && len <= MAX_MACHINE_NAME, 'configuration section: implausible machine-type length', {
    offset: lenAt,
    length: len,
  });
  const machineType = readPrintable(r, len, 'machine type');
  const config: Configuration = { machineType, capabilities: [], uuid: null };

  const seen = new Set<string>();
  for (;;) {
    await r.ensure(1 + 1 + 255 + 4 + 16);
    if (r.peek() !== Section.subsection) break;
    const at = r.offset;
    r.u8();
    const name = readPrintable(r, r.u8(), 'configuration subsection name');
    const version = r.be32();
    check(!seen.has(name), `configuration subsection ${name} appears twice`, { offset: at });
    seen.add(name);
    check(version === 1, `configuration subsection ${name}: unexpected version ${version}`, { offset: at, version });
    if (name === ConfigSubsection.targetPageBits) {
      const bits = r.be32();
      if (bits !== PAGE_SHIFT) {
        throw new UnsupportedError(`stream uses ${2 ** bits}-byte target pages; only 4 KiB pages are supported`, {
          offset: at,
          targetPageBits: bits,
        });
      }
    } else if (name === ConfigSubsection.capabilities) {
      const countAt = r.offset;
      const count = r.be32();
      check(count <= MAX_CAPABILITIES, 'configuration: implausible capability count', { offset: countAt, count });
      for (let i = 0; i < count; i++) {
        await r.ensure(1 + 255);
        config.capabilities.push(readPrintable(r, r.u8(), 'capability name'));
      }
    } else if (name === ConfigSubsection.uuid) {
      await r.ensure(16);
      config.uuid = formatUuid(r.bytes(16));
    } else {
      throw new UnsupportedError(`unknown configuration subsection ${name} (stream from a newer QEMU?)`, {
        offset: at,
        subsection: name,
      });
    }
  }
  return config;
}

/** Reads n buffered bytes as a printable-ASCII name; anything else is corruption. */
export function readPrintable(r: SequentialReader, n: number, what: string): string {
  const at = r.offset;
  check(n > 0, `${what}: empty`, { offset: at });
  const bytes = r.bytes(n);
  for (const b of bytes) {
    check(b >= 0x20 && b < 0x7f, `${what}: non-printable byte 0x${b.toString(16)}`, { offset: at });
  }
  return bytes.toString('latin1');
}

function formatUuid(b: Buffer): string {
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}
