/** A RAM block id (or any target name) as a file name: "/rom@etc/acpi/tables" → "rom@etc_acpi_tables". */
export function safeName(name: string): string {
  return name.replace(/^\/+/, '').replace(/[^A-Za-z0-9@._-]/g, '_') || 'block';
}
